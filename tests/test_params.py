"""params.yaml is typed and validated before any work; dvc.yaml only names keys that exist."""

import ast
import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

from stages.common.params import Params, ParamsError, load_params, parse_params, what_keys
from tests.conftest import REPO, repo_params, set_dotted


def test_committed_params_load_with_types():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.train.learning_rate == pytest.approx(5e-3)
    assert params.models.pretrain.steps > 0 and params.models.pretrain.swapped_colours
    assert params.train.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert params.extract.h5 == params.paths.demo_h5  # the YAML anchor keeps them one path


@pytest.mark.parametrize("key, value, message", [
    ("train.max_steps", "ten", "train.max_steps: expected an integer, got 'ten'"),
    ("train.random_flip", 1, "train.random_flip: expected true or false, got 1"),
    ("train.max_steps", 2.5, "train.max_steps: expected an integer"),
    ("train.learning_rate", "fast", "train.learning_rate: expected a number, got 'fast'"),
    ("generate.scheduler", "dpm", "generate.scheduler: expected one of 'unipc'"),
    ("train.target_modules", "to_q", "train.target_modules: expected a list of a string"),
    ("train.snr_gamma", -5, "train.snr_gamma: must be >= 0 (0: off; the paper's is 5)"),
    ("train.noise_offset", -0.1, "train.noise_offset: must be >= 0 (0: off; 0.05 to 0.1 is usual)"),
    ("train.caption_dropout", 1.5, "train.caption_dropout: must be in [0, 1] (a probability; 0: off)"),
    ("train.caption_dropout", -0.1, "train.caption_dropout: must be in [0, 1]"),
    ("train.text_encoder_rank", -1, "train.text_encoder_rank: must be >= 0 (0: no text encoder LoRA)"),
    ("train.text_encoder_target_modules", [], "train.text_encoder_target_modules: must name at least one module"),
    ("extract.resolution", 60, "extract.resolution: must be a multiple of 8"),
    ("canny.low_threshold", 300, "canny.low_threshold: must be >= 0 and <= canny.high_threshold"),
    ("paths", None, "paths: expected a mapping"),
    ("models.mode", "cloud", "models.mode: expected one of 'tiny', 'hub', 'local'"),
    ("models.alexnet_sha256", "7BE5", ("models.alexnet_sha256: expected its sha256 or a prefix of it, 8 to 64 "
                                       "lowercase hex digits (torchvision's file name carries 7be5be79), got '7BE5'")),
    ("models.alexnet_sha256", "", "models.alexnet_sha256: expected its sha256 or a prefix of it"),
    ("models.inception_sha256", "", ("models.inception_sha256: expected the file's full sha256 (64 lowercase hex "
                                     "digits: `sha256sum inception-2015-12-05.pt`), got '': the Inception is "
                                     "TorchScript, code that runs when loaded; clean-fid's file is f58cb9b6ec32")),
    ("models.inception_sha256", "f58cb9b6", "models.inception_sha256: expected the file's full sha256"),
    ("models.inception_url", "ftp://mirror.example/inception.pt",
     "models.inception_url: expected an http or https URL, got 'ftp://mirror.example/inception.pt'"),
    ("models.inception_url", "/data/inception-2015-12-05.pt", "models.inception_url: expected an http or https URL"),
    ("models.alexnet_url", "https://host:port@/x.pth",
     "models.alexnet_url: expected an http or https URL (not shown: it may hold a secret)"),
    ("models.base_revision", "main?x=1", "models.base_revision: expected a branch, tag or commit name"),
    ("models.clip_revision", "../main", "models.clip_revision: expected a branch, tag or commit name"),
    ("models.base_id", "https://huggingface.co/runwayml/sd",
     "models.base_id: expected a hub id like owner/name, not a URL"),
    ("models.local.inception", "https://mirror.example/i.pt",
     "models.local.inception: expected a path on this machine, not a URL"),
    ("models.base_revision", "", "models.base_revision: must not be empty; use main"),
    ("models.local", "/data/sd15", "models.local: expected a mapping"),
    ("models.local.unet", "/data/unet", "models.local.unet: unknown key; known keys: base, controlnet"),
    ("metrics.bootstrap_resamples", 10, "metrics.bootstrap_resamples: must be at least 100"),
    ("metrics.fid_bootstrap_resamples", 5, "metrics.fid_bootstrap_resamples: must be 0 (no FID delta interval) or at least 20"),
    ("metrics.edge_tolerance", -1, "metrics.edge_tolerance: must be >= 0 pixels"),
    ("metrics.tf32", "yes", "metrics.tf32: expected true or false"),
    ("plots.extreme_samples", -1, "plots.extreme_samples: must be >= 0"),
    ("train.controlnet", "yes", "train.controlnet: expected true or false, got 'yes'"),
    ("models.pretrain.swapped_colours", ["red", "green"],
     "models.pretrain.swapped_colours[0]: expected a list of a string"),
])
def test_bad_values_name_the_key(key, value, message):
    data = repo_params()
    set_dotted(data, key, value)
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(data)


def test_cuda_graphs_refuse_a_sampler_that_keeps_their_outputs():
    data = repo_params()
    data["generate"].update(compile="reduce-overhead", scheduler="pndm", guidance_scale=1.0)
    with pytest.raises(ParamsError, match=r"generate.compile: reduce-overhead cannot sample with pndm at "
                                          r"guidance_scale <= 1"):
        parse_params(data)
    data["generate"]["guidance_scale"] = 7.5  # guidance makes new tensors of the UNet's outputs
    parse_params(data)


def test_typo_suggests_the_right_key():
    data = repo_params()
    data["train"]["learnin_rate"] = data["train"].pop("learning_rate")
    message = "train.learnin_rate: unknown key; did you mean train.learning_rate?"
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(data)


def test_missing_key_and_missing_section():
    data = repo_params()
    del data["generate"]["steps"]
    with pytest.raises(ParamsError, match="generate.steps: missing key"):
        parse_params(data)
    data = repo_params()
    del data["metrics"]
    with pytest.raises(ParamsError, match="metrics: missing key"):
        parse_params(data)


def test_hub_ids_are_checked_outside_tiny_mode():
    data = repo_params()
    data["models"]["controlnet_id"] = "control_v11p_sd15_canny"
    parse_params(data)  # tiny mode never uses the id
    data["models"]["mode"] = "hub"
    with pytest.raises(ParamsError, match="models.controlnet_id: expected a hub id like owner/name"):
        parse_params(data)
    data["models"]["controlnet_id"] = "lllyasviel/control v11"
    with pytest.raises(ParamsError, match="models.controlnet_id: expected a hub id like owner/name"):
        parse_params(data)


SECRET_URLS = [  # (url, what it carries, the secret's parts, how the error prints it)
    ("https://alice:hunter2@mirror.example/inception-2015-12-05.pt", "a user name or password",
     ["alice", "hunter2"], "https://...@mirror.example/inception-2015-12-05.pt"),
    ("https://ghp_t0k3nvalue@mirror.example:8443/x.pt", "a user name or password", ["ghp_t0k3nvalue"],
     "https://...@mirror.example:8443/x.pt"),
    ("https://bucket.s3.example/x.pt?X-Amz-Signature=5ec7e7&X-Amz-Credential=AKIAEXAMPLE&token=tok99",
     "a query string", ["5ec7e7", "AKIAEXAMPLE", "tok99", "Signature"], "https://bucket.s3.example/x.pt?..."),
    ("https://mirror.example/x.pt#access_token=frag77", "a fragment", ["frag77", "access_token"],
     "https://mirror.example/x.pt#..."),
]


@pytest.mark.parametrize("key", ["inception", "alexnet"])
@pytest.mark.parametrize("url, what, secrets, shown", SECRET_URLS)
def test_a_url_with_credentials_is_refused_without_repeating_them(key, url, what, secrets, shown):
    """dvc.lock, sources.json, the report and the bundle would all copy such a URL."""
    data = repo_params()
    data["models"].update({f"{key}_url": url, f"{key}_sha256": "0" * 64})
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    message = str(err.value)
    assert message.startswith(f"params.yaml: models.{key}_url: {shown} carries {what}, which would be copied into "
                              "dvc.lock"), message
    assert "$FASHION_URL_TOKEN" in message and f"models.local.{key}" in message
    assert not [s for s in secrets if s in message], message


def test_digest_pins():
    """The Inception is TorchScript: only its full sha256 pins it. AlexNet's 8-hex prefix (what
    torchvision's file name carries) pins only torchvision's own URL."""
    data = repo_params()
    models = parse_params(data).models
    assert models.inception_sha256 == "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
    assert models.alexnet_sha256 == "7be5be79"
    data["models"]["alexnet_url"] = "https://mirror.example/models/alexnet-owt-7be5be79.pth"
    with pytest.raises(ParamsError, match=re.escape(
            "models.alexnet_sha256: expected the file's full sha256 (64 lowercase hex digits: `sha256sum "
            "alexnet-owt-7be5be79.pth`) for a URL other than torchvision's, got '7be5be79'")):
        parse_params(data)
    data["models"]["alexnet_sha256"] = "7be5be79" + "0" * 56
    parse_params(data)
    data["models"]["inception_url"] = "https://mirror.example/inception.pt"  # no hint of clean-fid's digest
    data["models"]["inception_sha256"] = "f58cb9b6"
    with pytest.raises(ParamsError, match=r"got 'f58cb9b6': the Inception is TorchScript, code that runs when "
                                          r"loaded$"):
        parse_params(data)


def test_revisions_and_mirrors_that_stay_valid():
    data = repo_params()
    data["models"].update(base_revision="refs/pr/32", controlnet_revision="v1.1+fp16", clip_revision="a" * 40,
                          inception_url="http://127.0.0.1:8080/files/inception-2015-12-05.pt",
                          alexnet_url="https://cdn.example/npm/alexnet@1.0/alexnet.pth", alexnet_sha256="a" * 64)
    models = parse_params(data).models
    assert models.base_revision == "refs/pr/32" and models.alexnet_url.endswith("@1.0/alexnet.pth")


def test_yaml_float_spellings():
    data = repo_params()
    data["train"]["learning_rate"] = "1e-4"  # PyYAML reads 1e-4 (no dot) as a string
    assert parse_params(data).train.learning_rate == pytest.approx(1e-4)


def test_stage_prints_one_line_error(tmp_path):
    data = repo_params()
    data["train"]["learnin_rate"] = data["train"].pop("learning_rate")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "stages.train_lora"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: train.learnin_rate: unknown key; did you mean train.learning_rate?"]


def test_dvc_yaml_names_only_existing_params_and_paths():
    params = repo_params()
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())

    def exists(dotted):
        node = params
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    text = "\n".join(line.split("#")[0] for line in (REPO / "dvc.yaml").read_text().splitlines())
    for ref in re.findall(r"\$\{([^}]+)\}", text):
        assert exists(ref), f"dvc.yaml interpolates ${{{ref}}}, which params.yaml lacks"
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"python -m stages.{name.replace('-', '_')}"
        assert (REPO / "stages" / f"{name.replace('-', '_')}.py").is_file()
        for key in stage.get("params", []):
            assert exists(key), f"stage {name} depends on {key}, which params.yaml lacks"


# Which params.yaml sections each stage reads, beyond its own; "how" knobs are never listed.
STAGE_SECTIONS = {"demo-data": ["demo"], "fetch-models": ["models"], "extract": ["extract"], "canny-edges": ["canny"],
                  "train-lora": ["train"], "generate-baseline": ["generate"], "generate-lora": ["generate"],
                  "metrics": ["metrics"], "plots": ["plots"]}
CANNY = {"canny.low_threshold", "canny.high_threshold"}  # metrics and plots redraw generated images' edges
# metrics: which generated files there are and how they pair
EXTRA = {"train-lora": {"extract.resolution"} | CANNY, "metrics": CANNY | {"generate.images_per_condition"},
         "plots": CANNY,
         "fetch-models": {"extract.resolution"} | CANNY}  # tiny mode pretrains on the demo's own edges
NOT_A_PARAM = {"extract.h5",  # a dep (interpolated path), not a param
               "generate.lora_scale@generate-baseline"}


def _listed_keys(entries: list[str], params) -> set[str]:
    """dvc.yaml params entries as keys: a section stands for all its keys."""
    keys = set()
    for entry in entries:
        if "." in entry:
            keys.add(entry)
            continue
        section = getattr(params, entry)
        assert set(what_keys(section)) == {f.name for f in dataclasses.fields(section)}, \
            f"{entry} has how-knobs: list its other keys, not the section"
        keys |= {f"{entry}.{k}" for k in what_keys(section)}
    return keys


def test_each_stage_lists_exactly_the_params_it_uses():
    params = load_params(REPO / "params.yaml")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, sections in STAGE_SECTIONS.items():
        expected = {f"{s}.{k}" for s in sections for k in what_keys(getattr(params, s))} | EXTRA.get(name, set())
        expected = {k for k in expected if k not in NOT_A_PARAM and f"{k}@{name}" not in NOT_A_PARAM}
        assert _listed_keys(dvc["stages"][name]["params"], params) == expected, name


def test_a_stage_that_reads_a_whole_section_lists_the_section():
    params = load_params(REPO / "params.yaml")
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        listed = set(stage.get("params", []))
        for section in {key.split(".")[0] for key in listed if "." in key}:
            every = {f"{section}.{f.name}" for f in dataclasses.fields(getattr(params, section))}
            assert not every <= listed, f"{name} lists every key of {section}: list `{section}` instead"


def test_report_reruns_on_every_section_it_prints():
    from stages import report

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert dvc["stages"]["report"]["params"] == list(report.SECTIONS)


NO_OUTPUT_EFFECT = {"stages/common/cli.py", "stages/common/errors.py", "stages/common/params.py",
                    "stages/common/__init__.py", "stages/demo/__init__.py"}


def _imported_modules(path, seen=None) -> set[str]:
    """stages/... files that `path` imports, transitively."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            file = name.replace(".", "/") + ".py"
            if (REPO / file).is_file() and file not in seen:
                seen.add(file)
                _imported_modules(file, seen)
    return seen


def test_each_stage_depends_on_exactly_the_code_it_imports():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        module = f"stages/{name.replace('-', '_')}.py"
        code = {d for d in stage["deps"] if d.startswith("stages/") and d.endswith(".py")}
        assert code == ({module} | _imported_modules(module)) - NO_OUTPUT_EFFECT, name


def test_extract_depends_on_the_tokenizer_it_reads():
    from stages.common.dataset import TOKENIZER_DIR

    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["extract"]["deps"]
    assert f"${{paths.base_model}}/{TOKENIZER_DIR}" in deps
