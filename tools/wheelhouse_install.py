"""Install the project from this wheelhouse, with no internet: everything but torch, which the box
brings (a GPU image's own CUDA build).

    python /kaggle/input/<dataset>/install.py [pip install options, e.g. --dry-run]

`make wheelhouse` (tools/wheelhouse.py) copies this file into the folder beside the wheels,
requirements.txt and wheelhouse.json. It checks first that this Python and platform are ones the
wheels were built for, and that torch is installed, so that a mismatch is one line rather than
pip's page of "no matching distribution"; then it runs
`python -m pip install --no-index --find-links <folder> -r <folder>/requirements.txt`.
Standard library only, and old syntax: it must run, if only to say no, on any Python 3.
"""

import importlib.util
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def fail(message):
    print("wheelhouse: " + message, file=sys.stderr)
    sys.exit(1)


def version_key(version):
    return tuple(int(part) for part in version.split("."))


def span(versions):
    """['3.10', '3.11', '3.12'] -> '3.10-3.12'; gaps are listed: '3.10, 3.12'."""
    versions = sorted(versions, key=version_key)
    minors = [version_key(v)[1] for v in versions]
    if len(versions) > 1 and minors == list(range(minors[0], minors[0] + len(minors))):
        return versions[0] + "-" + versions[-1]
    return ", ".join(versions)


def mismatch(manifest):
    """None if this interpreter can install the wheels, else the one line that says why not."""
    python = "%d.%d" % sys.version_info[:2]
    implementation, machine = platform.python_implementation(), platform.machine()
    libc, libc_version = platform.libc_ver()
    built = "built for %s %s on manylinux %s (glibc %s or newer)" % (
        manifest["implementation"], span(manifest["pythons"]), manifest["machine"], manifest["glibc"])
    this = "this is %s %s on %s %s" % (implementation, python, sys.platform, machine)
    glibc_ok = libc == "glibc" and version_key(libc_version) >= version_key(manifest["glibc"])
    if not sys.platform.startswith("linux") or machine != manifest["machine"] or not glibc_ok:
        this += " (%s)" % (libc + " " + libc_version if libc else "no glibc")
        return "%s, %s: its wheels cannot install here" % (built, this)
    if implementation != manifest["implementation"] or python not in manifest["pythons"]:
        return ("%s, %s; rebuild it with `make wheelhouse PYTHONS=%s` on a machine with internet"
                % (built, this, python))
    return None


def main(pip_args):
    with open(os.path.join(HERE, "wheelhouse.json")) as f:
        manifest = json.load(f)
    problem = mismatch(manifest)
    if problem:
        fail(problem)
    missing = [name for name in ("torch", "torchvision") if importlib.util.find_spec(name) is None]
    if missing:
        fail("%s not installed: the wheelhouse leaves torch out because the box brings its own CUDA build; "
             "use a GPU image that has torch and torchvision (Kaggle's do), or install them first"
             % " and ".join(missing))
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", HERE,
               "-r", os.path.join(HERE, "requirements.txt")] + pip_args
    print("wheelhouse: %s %s for %s: %s" % (manifest["project"], manifest["version"],
                                          "%d.%d" % sys.version_info[:2], " ".join(command)), flush=True)
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main(sys.argv[1:])
