"""The stage folders install as mimkit.* and never shadow Hugging Face's `tokenizers`."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stage_packages_import():
    import mimkit.finetune
    import mimkit.pretrain
    import mimkit.tokenizers

    assert mimkit.tokenizers.__file__.startswith(os.path.join(ROOT, "tokenizers"))


def test_demo_is_an_application_the_mimkit_command_hands_over_to():
    import mimkit.demo

    assert mimkit.demo.__file__.startswith(os.path.join(ROOT, "demo"))
    # `mimkit demo` (make demo) runs `python -m mimkit.demo` in its place: the library never imports the app.
    out = subprocess.run([sys.executable, "-m", "mimkit.cli", "demo", "--help"], cwd="/", capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("usage: mimkit demo"), out.stdout + out.stderr


def test_hf_tokenizers_not_shadowed_under_pytest():
    # pytest runs from the repository root, where ./tokenizers/ exists: the import must be Hugging Face's.
    assert os.path.isdir(os.path.join(ROOT, "tokenizers"))
    import tokenizers
    import transformers.tokenization_utils_fast  # noqa: F401  (imports tokenizers.pre_tokenizers)

    assert "site-packages" in tokenizers.__file__


def test_hf_tokenizers_not_shadowed_by_a_stage_script():
    # `deepspeed tokenizers` / `python tokenizers` put tokenizers/ itself (not the root) on sys.path.
    code = "import sys; sys.path.insert(0, %r); import tokenizers; print(tokenizers.__file__)" % os.path.join(ROOT, "tokenizers")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert "site-packages" in out.stdout, out.stdout


def test_no_script_folder_shadows_the_standard_library():
    # `python bench/x.py` / `python pretrain` put that folder first on sys.path: a file there named
    # after a standard-library module (tokenize.py, ...) would break numpy's and torch's imports.
    folders = ["bench", "tokenizers", "pretrain", "finetune", "demo", "slurm", "scripts"]
    names = {p.stem for f in folders for p in __import__("pathlib").Path(ROOT, f).glob("*.py")}
    assert not names & set(sys.stdlib_module_names) - {"__main__"}, names & set(sys.stdlib_module_names)
