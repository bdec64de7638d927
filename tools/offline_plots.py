"""Build the HTML template that makes `dvc plots show` and `dvc plots diff` draw offline.

    python -m tools.offline_plots        # needs the npm registry once; writes TEMPLATE

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so without internet (Kaggle with
internet off, a cluster node, the demo) it is blank although the data is in it. This page inlines
the three libraries' minified builds from their published npm packages, pinned by version and
checked against the registry's sha512, with each licence kept in a comment above its code.
`.dvc/config` points `plots.html_template` at it (relative to .dvc/), so every `dvc plots`
command uses it. The majors are the ones dvc-render's CDN page loads (vega 5, vega-lite 5,
vega-embed 6), at their latest releases.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

TEMPLATE = Path(".dvc/plots/offline.html")
# (package, version, npm's dist.integrity, the build inside the tarball)
PACKAGES = [
    ("vega", "5.33.1", "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
     "build/vega.min.js"),
    ("vega-lite", "5.23.0", "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
     "build/vega-lite.min.js"),
    ("vega-embed", "6.29.0",
     "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
     "build/vega-embed.min.js"),
]
REGISTRY = "https://registry.npmjs.org"
# vega's npm tarball ships no LICENSE file (package.json says BSD-3-Clause): this is the LICENSE of
# its repository, github.com/vega/vega, which the clause asks us to keep with the code.
VEGA_LICENSE = """Copyright (c) 2015-2023, University of Washington Interactive Data Lab
All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this list of conditions
   and the following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of
   conditions and the following disclaimer in the documentation and/or other materials provided
   with the distribution.
3. Neither the name of the copyright holder nor the names of its contributors may be used to
   endorse or promote products derived from this software without specific prior written
   permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE,
DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER
IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT
OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""
# dvc-render fills {plot_divs} (and {refresh_tag} for `dvc plots show --open` live pages); without a
# {scripts} placeholder it adds no CDN script tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot (offline)</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def package_files(name: str, version: str, integrity: str, build: str) -> tuple[str, str]:
    """The minified build and the licence text of one npm package, its tarball checked first."""
    url = f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")
    if digest != integrity:
        raise SystemExit(f"{url}: sha512 {digest} is not the pinned {integrity}; refusing it")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        code = archive.extractfile(f"package/{build}").read().decode("utf-8")
        names = archive.getnames()
        licence = (archive.extractfile("package/LICENSE").read().decode("utf-8") if "package/LICENSE" in names
                   else VEGA_LICENSE if name == "vega" else None)
    if licence is None:
        raise SystemExit(f"{url}: no LICENSE file; add its licence text here before inlining it")
    return code, licence


def script(name: str, version: str, code: str, licence: str) -> str:
    if "</script" in code.lower():  # would end the inline script early
        raise SystemExit(f"{name}@{version}: its build holds '</script', which cannot be inlined")
    comment = licence.replace("*/", "* /")
    return f"<script>/*! {name}@{version}, from npm. Its licence:\n{comment}*/\n{code}\n</script>"


def main() -> None:
    scripts = [script(name, version, *package_files(name, version, integrity, build))
               for name, version, integrity, build in PACKAGES]
    page = PAGE.format(scripts="\n".join(scripts))
    for placeholder in ("{scripts}", "{plot_divs}", "{refresh_tag}"):  # dvc-render would fill them in the code
        if page.count(placeholder) != (placeholder != "{scripts}"):
            raise SystemExit(f"a library's code holds {placeholder}, which dvc-render would replace")
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(page, encoding="utf-8")
    print(f"wrote {TEMPLATE} ({len(page.encode()) / 1e6:.2f} MB): "
          + ", ".join(f"{name}@{version}" for name, version, _, _ in PACKAGES), file=sys.stderr)


if __name__ == "__main__":
    main()
