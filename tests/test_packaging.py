"""The package installs and imports as the README says, and CI runs the README's test command."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_readme_has_main_and_test_commands_first():
    cmds = _readme_commands()
    assert "python3 -m autotune --gpu a100 --model phi3" in cmds[0]
    assert "pytest" in cmds[1]
    for cmd in cmds[:2]:
        assert "torch==2.13.0" in cmd and "triton==3.6.0" in cmd and '"numpy<2.4"' in cmd


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1].strip() in ci


def test_kernels_imports_without_optuna_pandas_matplotlib():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('optuna', 'pandas', 'matplotlib'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import kernels, kernels.reference, kernels.config\n"
        "from kernels import KernelConfig\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_main_command_exits_zero():
    out = subprocess.run([sys.executable, "-m", "autotune", "--gpu", "a100", "--model", "phi3", "--help"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
