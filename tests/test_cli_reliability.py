"""The four CLIs refuse bad output paths and missing extras in one line (exit 2) before loading
anything, print the seed before generating, and document every option with its default."""

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from linfusion.engines import builder
import linfusion.engines.cli as build_cli
import linfusion.export.cli as export_cli
import linfusion.export.validation.cli as validate_cli
import linfusion.runtime.cli as generate_cli
from linfusion.runtime.pipeline import Pipeline

CLIS = {"linfusion-generate": generate_cli, "linfusion-export": export_cli, "linfusion-build": build_cli,
        "linfusion-validate": validate_cli}


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot create files in."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        yield locked
        locked.chmod(0o700)
    elif Path("/proc").is_dir():
        yield Path("/proc")  # root writes anywhere, except in special file systems
    else:
        pytest.skip("no unwritable directory for root here")


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("not a directory")
    return path


# --- help ----------------------------------------------------------------------------------------

def _options(p: argparse.ArgumentParser):
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("prog", list(CLIS))
def test_every_option_has_help_and_shows_its_default(prog):
    p = CLIS[prog].parser()
    assert p.prog == prog
    formatter = p._get_formatter()
    for action in _options(p):
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"{prog} {action.dest} has no description"
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.option_strings and not action.required and not flag:
            assert "default" in text.lower(), f"{prog} {action.option_strings[0]} does not show its default"
        if action.default not in (None, False, ""):
            assert str(action.default) in text, f"{prog} {action.dest}: default {action.default} not shown"
    text = p.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "``" not in text, "raw markup in --help"
    assert "exit status" in text and "2 " in text


def test_generate_help_lists_every_scheduler_and_pndm():
    from linfusion.runtime.schedulers import SCHEDULERS

    text = generate_cli.parser().format_help()
    for name in [*SCHEDULERS, "pndm"]:
        assert name in text


# --- linfusion-generate ----------------------------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the export was loaded before the arguments were checked")

    monkeypatch.setattr(Pipeline, "from_export", classmethod(loaded))


@pytest.mark.parametrize("name", ["x.txt", "x", "dir.png", "plain.txt/x.png", "UNWRITABLE/sub/x.png"])
def test_generate_refuses_bad_outputs_before_loading(name, tmp_path, a_file, unwritable, no_loading, capsys):
    (tmp_path / "dir.png").mkdir()
    output = str(unwritable / "sub" / "x.png") if name.startswith("UNWRITABLE") else str(tmp_path / name)
    code = generate_cli.main([str(tmp_path / "export"), "--prompt", "x", "--output", output])
    one_line_error(code, capsys.readouterr().err, "--output")


def test_generate_checks_every_numbered_output(tmp_path, no_loading, capsys):
    (tmp_path / "img_1.png").mkdir()
    code = generate_cli.main([str(tmp_path), "--prompt", "x", "--num-images", "2",
                              "--output", str(tmp_path / "img.png")])
    one_line_error(code, capsys.readouterr().err, "img_1.png")


def test_generate_checks_the_scheduler_and_tensorrt_before_loading(tmp_path, no_loading, capsys, monkeypatch):
    from linfusion.runtime import schedulers

    # a registry without lcm, without reordering the real one
    monkeypatch.setattr(schedulers, "SCHEDULERS", {k: v for k, v in schedulers.SCHEDULERS.items() if k != "lcm"})
    code = generate_cli.main([str(tmp_path), "--prompt", "x", "--scheduler", "lcm",
                              "--output", str(tmp_path / "a.png")])
    one_line_error(code, capsys.readouterr().err, "unknown scheduler 'lcm'")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = generate_cli.main([str(tmp_path), "--prompt", "x", "--backend", "tensorrt",
                              "--output", str(tmp_path / "a.png")])
    one_line_error(code, capsys.readouterr().err, "pip install 'linfusion-deploy[gpu]'", "[gpu-cu13]")


class _FakePipe:
    backend = "onnxruntime"
    loras = ()

    def __init__(self, calls, scheduler=None, image=None):
        self.calls, self.scheduler, self.image = calls, scheduler, image
        self.scheduler_config = {"_class_name": "DDIMScheduler"}

    def __call__(self, prompt, **kwargs):
        self.calls.append(kwargs)
        images = [self.image or Image.new("RGB", (8, 8), (200, 10, 10))] * kwargs["num_images_per_prompt"]
        timings = {"encode": 0.1, "unet_per_step": 0.01, "denoise": 0.2, "decode": 0.1, "total": 0.5}
        result = SimpleNamespace(images=images, seed=kwargs["seed"], timings=timings)
        if self.scheduler:
            result.scheduler = self.scheduler
        return result


def _fake_loader(monkeypatch, capsys, stdout_at_load, calls, **pipe):
    def from_export(cls, directory, **kwargs):
        stdout_at_load.append(capsys.readouterr().out)
        return _FakePipe(calls, **pipe)

    monkeypatch.setattr(Pipeline, "from_export", classmethod(from_export))
    monkeypatch.setattr(generate_cli, "check_size_and_stages", lambda args: None)  # no manifest here


def test_generate_prints_a_random_seed_before_loading(tmp_path, monkeypatch, capsys):
    at_load, calls = [], []
    _fake_loader(monkeypatch, capsys, at_load, calls)
    monkeypatch.setattr(generate_cli.os, "urandom", lambda n: bytes([1, 2, 3, 4])[:n])
    code = generate_cli.main([str(tmp_path), "--prompt", "x", "--num-images", "2",
                              "--output", str(tmp_path / "out" / "img.webp")])
    out = capsys.readouterr().out
    assert code == 0
    seed = 0x04030201  # os.urandom's four bytes, little-endian
    assert at_load == [f"seed {seed}\n"], "the seed must be printed before the models load"
    assert calls[0]["seed"] == seed
    assert f"seed {seed}; scheduler ddim; backend onnxruntime" in out  # DDIMScheduler's registry name
    assert (tmp_path / "out" / "img_0.webp").is_file() and (tmp_path / "out" / "img_1.webp").is_file()


def test_generate_summary_names_the_scheduler_that_ran(tmp_path, monkeypatch, capsys):
    at_load, calls = [], []
    _fake_loader(monkeypatch, capsys, at_load, calls, scheduler="pndm")
    code = generate_cli.main([str(tmp_path), "--prompt", "x", "--seed", "7",
                              "--output", str(tmp_path / "a.png")])
    assert code == 0 and at_load == ["seed 7\n"]
    assert "seed 7; scheduler pndm;" in capsys.readouterr().out
    _fake_loader(monkeypatch, capsys, at_load, calls)
    assert generate_cli.main([str(tmp_path), "--prompt", "x", "--scheduler", "euler_a",
                              "--output", str(tmp_path / "a.jpg")]) == 0
    assert "; scheduler euler_a;" in capsys.readouterr().out


def test_a_failed_save_still_reports_the_seed(tmp_path, monkeypatch, capsys):
    class Unsavable:
        def save(self, path):
            raise OSError("disk full")

    _fake_loader(monkeypatch, capsys, [], [], image=Unsavable())
    code = generate_cli.main([str(tmp_path), "--prompt", "x", "--seed", "11",
                              "--output", str(tmp_path / "a.png")])
    one_line_error(code, capsys.readouterr().err, "disk full", "seed 11")


# --- linfusion-export ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["file", "parent-file", "unwritable", "exists"])
def test_export_refuses_bad_outputs_before_loading(case, tmp_path, a_file, unwritable, monkeypatch, capsys):
    import linfusion.loader

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(linfusion.loader, "load_pipeline", loaded)
    (tmp_path / "exists").mkdir()
    output = {"file": a_file, "parent-file": a_file / "out", "unwritable": unwritable / "out",
              "exists": tmp_path / "exists"}[case]
    code = export_cli.main(["--model", "tiny-sd", "--output", str(output)])
    one_line_error(code, capsys.readouterr().err)


# --- linfusion-build -------------------------------------------------------------------------------

@pytest.fixture
def no_building(monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("build_all was called")

    monkeypatch.setattr(builder, "build_all", built)


@pytest.mark.parametrize("case", ["output-file", "output-unwritable", "cache-dir", "cache-parent-file"])
def test_build_refuses_bad_outputs_before_loading(case, tmp_path, a_file, unwritable, monkeypatch, capsys,
                                                  no_building):
    def loaded(*args, **kwargs):
        raise AssertionError("the export was loaded before the output paths were checked")

    monkeypatch.setattr(build_cli, "load_manifest", loaded)
    args = {"output-file": ["--output", str(a_file)],
            "output-unwritable": ["--output", str(unwritable / "e")],
            "cache-dir": ["--timing-cache", str(tmp_path)],
            "cache-parent-file": ["--timing-cache", str(a_file / "t.cache")]}[case]
    code = build_cli.main([str(tmp_path), "--output", str(tmp_path / "engines"), *args])
    one_line_error(code, capsys.readouterr().err)


def test_build_without_tensorrt_names_the_gpu_extras(tmp_path, monkeypatch, capsys, no_building):
    monkeypatch.setattr(build_cli, "load_manifest",
                        lambda directory: SimpleNamespace(pixel_multiple=32, components={"unet": None},
                                                          pipeline=SimpleNamespace(max_size=None,
                                                                                   max_batch2_size=None)))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = build_cli.main([str(tmp_path), "--output", str(tmp_path / "engines")])
    one_line_error(code, capsys.readouterr().err, "TensorRT is not installed",
                   "pip install 'linfusion-deploy[gpu]'", "'linfusion-deploy[gpu-cu13]'")
    assert not (tmp_path / "engines").exists()


# --- linfusion-validate ----------------------------------------------------------------------------

@pytest.fixture
def no_validation(monkeypatch):
    from linfusion.export.validation.validate import ValidationInputError

    def validate(options, progress):
        raise ValidationInputError("validation started")

    monkeypatch.setattr(validate_cli, "validate", validate)


@pytest.mark.parametrize("args", [
    ["--report", "r.txt"], ["--report", "DIR"], ["--report", "FILE/r.json"],
    ["--report", "UNWRITABLE/r.json"], ["--save-reference", "ref.npy"], ["--save-reference", "FILE/ref"],
    ["--save-reference", "UNWRITABLE/ref"],
])
def test_validate_refuses_bad_outputs_before_checking(args, tmp_path, a_file, unwritable, no_validation,
                                                      capsys):
    (tmp_path / "export").mkdir()
    path = args[1].replace("UNWRITABLE", str(unwritable)).replace("FILE", str(a_file))
    path = str(tmp_path) if path == "DIR" else path if os.path.isabs(path) else str(tmp_path / path)
    base = [str(tmp_path / "export")]
    if args[0] == "--report":
        base += ["--load-reference", str(tmp_path / "ref")]
    code = validate_cli.main([*base, args[0], path])
    err = one_line_error(code, capsys.readouterr().err, args[0])
    assert "validation started" not in err


def test_validate_tensorrt_alone_without_tensorrt_cannot_validate(tmp_path, monkeypatch, no_validation,
                                                                  capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "export").mkdir()
    base = [str(tmp_path / "export"), "--load-reference", str(tmp_path / "ref")]
    err = one_line_error(validate_cli.main([*base, "--backends", "tensorrt"]), capsys.readouterr().err,
                         "tensorrt", "[gpu]")
    assert "validation started" not in err and "FAILED" not in err
    for both in (["--backends", "onnxruntime,tensorrt"], []):  # TensorRT stays "skipped" next to ORT
        one_line_error(validate_cli.main([*base, *both]), capsys.readouterr().err, "validation started")


# --- a runtime-only environment --------------------------------------------------------------------

NOT_IN_RUNTIME = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnx_ir", "onnx_graphsurgeon",
                  "polygraphy", "tensorrt")
BLOCKER = textwrap.dedent(f"""
    import sys
    for name in {NOT_IN_RUNTIME!r}:
        sys.modules[name] = None  # import raises ModuleNotFoundError; find_spec says "not installed"
""")


def run_runtime_only(module: str, args: list[str]) -> subprocess.CompletedProcess:
    code = BLOCKER + f"from {module} import main\nsys.exit(main({args!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("module, args, needles", [
    ("linfusion.engines.cli", ["EXPORT"], ["onnx", "pip install 'linfusion-deploy[gpu]'", "[gpu-cu13]"]),
    ("linfusion.export.cli", ["--model", "tiny-sd", "--output", "OUT"],
     ["torch", "linfusion-deploy[export]"]),
    ("linfusion.export.validation.cli", ["EXPORT", "--load-reference", "REF"],
     ["polygraphy", "pip install 'linfusion-deploy[gpu]'"]),
    ("linfusion.export.validation.cli", ["EXPORT"],
     ["torch", "linfusion-deploy[export]", "--load-reference"]),
])
def test_runtime_only_environment_names_the_extra(module, args, needles, tmp_path):
    (tmp_path / "export").mkdir()
    args = [{"EXPORT": str(tmp_path / "export"), "OUT": str(tmp_path / "out"), "REF": str(tmp_path / "ref")}
            .get(a, a) for a in args]
    result = run_runtime_only(module, args)
    one_line_error(result.returncode, result.stderr, *needles)
    assert "FAILED" not in result.stdout
    assert not (tmp_path / "out").exists()


def test_generate_checks_outputs_in_a_runtime_only_environment(tmp_path):
    result = run_runtime_only("linfusion.runtime.cli", [str(tmp_path), "--prompt", "x",
                                                        "--output", str(tmp_path / "x.txt")])
    one_line_error(result.returncode, result.stderr, "--output", ".png")


# --- the shared checks -----------------------------------------------------------------------------

def test_output_checks(tmp_path, a_file):
    from linfusion.runtime.cli_checks import CliError, check_output_dir, check_output_file, numbered_paths

    assert check_output_file(tmp_path / "new" / "deeper" / "a.PNG", "--o", (".png",)).name == "a.PNG"
    assert not (tmp_path / "new").exists(), "checking must not create anything"
    for bad in (tmp_path / "a.gif", tmp_path, a_file / "a.png"):
        with pytest.raises(CliError):
            check_output_file(bad, "--o", (".png",))
    assert check_output_dir(tmp_path / "fresh", "--o") == tmp_path / "fresh"
    with pytest.raises(CliError, match="--force"):
        check_output_dir(tmp_path, "--o")
    assert check_output_dir(tmp_path, "--o", force=True) == tmp_path
    assert check_output_dir(tmp_path, "--o", reuse=True) == tmp_path
    with pytest.raises(CliError, match="not a directory"):
        check_output_dir(a_file, "--o", force=True)
    assert numbered_paths(Path("d/img.png"), 2) == [Path("d/img_0.png"), Path("d/img_1.png")]
    assert numbered_paths(Path("d/img.png"), 1) == [Path("d/img.png")]


def test_require_extra_and_the_formatter():
    from linfusion.runtime.cli_checks import HelpFormatter, MissingExtra, image_suffixes, require_extra

    assert require_extra("json", "runtime", "x").dumps(1) == "1"
    with pytest.raises(MissingExtra) as info:
        require_extra("linfusion_no_such_module", "export", "exporting")
    message = str(info.value)
    assert "\n" not in message and message.endswith("pip install 'linfusion-deploy[export]'")
    assert {".png", ".jpg", ".jpeg"} <= set(image_suffixes())
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--a", help="aa")
    p.add_argument("--b", action="store_true", help="bb")
    p.add_argument("--c", type=int, default=3, help="cc")
    text = p.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: 3)" in text
