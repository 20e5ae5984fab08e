"""What a new user meets before any work: the repository root as working directory, bad backend
settings, unwritable output paths, Ctrl-C. Every command answers on one line with the documented
exit status (0 ok, 1 findings, 2 usage, 130 interrupted) and leaves no partial file."""
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normops import check, cli, cliutil, current_backend, guide, lessons, models
from normops.cli import bench as bench_command, check as check_command

inspect = importlib.import_module("normops.inspect")  # the module (normops.inspect is also the function)

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {  # a cheap invocation of every subcommand
    "check": ["check", "--quick", "--op", "layer_norm"],
    "bench": ["bench", "--quick", "--op", "layer_norm", "--reps", "1"],
    "models": ["models", "--quick", "--only", "lstm", "--no-progress"],
    "demo": ["demo", "batchnorm", "--quick"],
    "guide": ["guide", "--table"],
    "inspect": ["inspect", "resnet", "--static"],
}
UNWRITABLE = "/proc/normops-test"  # a folder nobody can create, root included


def one_line(text):
    """The one message line of ``text`` (stderr), progress-bar redraws aside."""
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, text
    return lines[0]


def test_repository_root_does_not_shadow_pypi_kernels():
    """The top-level kernels/ folder (installed as normops.kernels) must not hide PyPI's `kernels`,
    which transformers imports, from a Python started in the repository root."""
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, "-c", "from transformers import BertModel; import normops.kernels"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_repository_root_kernels_is_not_a_module_of_its_own():
    """Without any other `kernels` on sys.path (-S: no site-packages), `import kernels` in the
    repository root fails as if the folder were not there."""
    proc = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, ''); import kernels"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_normops_backend_is_a_usage_error_before_any_work(command, monkeypatch, capsys):
    monkeypatch.setenv("NORMOPS_BACKEND", "bogus")
    monkeypatch.setattr(check_command, "run", pytest.fail)  # nothing may run
    monkeypatch.setattr(bench_command, "run", pytest.fail)
    assert cli.main(COMMANDS[command]) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith(f"normops {command}: error:") and "'bogus'" in line
    assert all(name in line for name in ("torch", "triton", "numpy"))
    assert captured.out == ""


@pytest.mark.parametrize("command", ["check", "bench", "models", "demo", "inspect"])
def test_bad_backend_option_is_one_line(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(COMMANDS[command] + ["--backend", "bogus"])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert "invalid choice: 'bogus'" in line and "'numpy'" in line and f"normops {command} --help" in line


def test_triton_backend_without_a_device_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(check, "triton_interpret", lambda: False)
    monkeypatch.setattr(cli, "default_device", lambda: "cpu")
    monkeypatch.setattr(bench_command, "run", pytest.fail)
    assert cli.main(COMMANDS["bench"] + ["--backend", "triton", "--device", "cpu"]) == 2
    assert "TRITON_INTERPRET=1" in one_line(capsys.readouterr().err)


def test_backend_option_runs_the_command_on_that_backend(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_command, "run", lambda args: seen.append(current_backend("cpu")) or 0)
    assert cli.main(COMMANDS["bench"] + ["--backend", "numpy"]) == 0
    assert seen == ["numpy"] and current_backend("cpu") == "torch"  # and not after it


def test_check_names_the_backends_it_ran_and_skipped(monkeypatch, capsys):
    # as without TRITON_INTERPRET (unsetting it would change how torch's own Triton code imports)
    monkeypatch.setattr(check, "triton_interpret", lambda: False)
    monkeypatch.setattr(check, "default_device", lambda: "cpu")
    assert cli.main(COMMANDS["check"] + ["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "backends checked: torch (cpu), numpy (cpu)" in out
    skipped = next(line for line in out.splitlines() if line.startswith("backend skipped:"))
    assert "triton (cpu)" in skipped and "set it to include" in skipped and "TRITON_INTERPRET=1" in skipped


@pytest.mark.parametrize("command,target", [
    ("check", (check_command, "run_case")),
    ("bench", (bench_command, "run_bench_case")),
    ("models", (models, "_run")),
    ("demo", (lessons, "run")),
    ("guide", (guide, "format_reference_table")),
    ("inspect", (inspect, "inspect")),
])
def test_ctrl_c_is_one_line_and_exit_130(command, target, monkeypatch, capsys, tmp_path):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(*target, interrupt)
    monkeypatch.chdir(tmp_path)
    argv = COMMANDS[command] + (["--out", str(tmp_path / "out")] if command in ("models", "demo") else [])
    assert cli.main(argv) == 130
    assert one_line(capsys.readouterr().err) == f"normops {command}: interrupted"


def test_ctrl_c_in_a_real_run_leaves_no_partial_file(tmp_path):
    """SIGINT to the console script while bench times its cases: one line, 130, no JSON or PNG."""
    exe = Path(sys.executable).with_name("normops")
    exe = str(exe) if exe.exists() else "normops"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([exe, "bench", "--reps", "100000", "--op", "layer_norm", "--json", str(tmp_path / "b.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen, deadline = b"", time.monotonic() + 120
        while b"normops bench" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stderr.read1(4096)  # the progress bar: the imports are done and the timing runs
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        err = (seen + err).decode()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.replace("\r", "\n").rstrip().endswith("normops bench: interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["bench", "--quick", "--json", f"{UNWRITABLE}/b.json"],
    ["bench", "--quick", "--plot", f"{UNWRITABLE}/b.png"],
    ["models", "--quick", "--out", UNWRITABLE],
    ["demo", "all", "--quick", "--out", UNWRITABLE],
])
def test_unwritable_output_is_a_usage_error_before_any_work(argv, monkeypatch, capsys):
    for target in ((bench_command, "run_bench_case"), (models, "_run"), (lessons, "run")):
        monkeypatch.setattr(*target, pytest.fail)
    assert cli.main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert UNWRITABLE in line and f"normops {argv[0]}: error:" in line


def test_output_path_that_is_a_folder_is_refused(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--json", str(tmp_path)]) == 2
    assert "is a folder" in one_line(capsys.readouterr().err)


def test_atomic_output_leaves_nothing_when_writing_fails(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        with cliutil.atomic_output(path) as tmp:
            Path(tmp).write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with cliutil.atomic_output(path) as tmp:
        Path(tmp).write_text("whole")
    assert path.read_text() == "whole" and list(tmp_path.iterdir()) == [path]
    assert path.stat().st_mode & 0o044  # readable by others as open() would make it, not mkstemp's 0600


def test_help_documents_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(s in out for s in ("0 ok", "1 findings", "2 usage error", "130 interrupted"))



@pytest.mark.parametrize("command", ["bench", "models", "demo", "inspect"])
def test_normops_backend_triton_without_a_device_is_refused_before_any_work(command, monkeypatch, capsys):
    monkeypatch.setenv("NORMOPS_BACKEND", "triton")
    monkeypatch.setattr(check, "triton_interpret", lambda: False)
    monkeypatch.setattr(cli, "default_device", lambda: "cpu")
    for target in ((bench_command, "run_bench_case"), (models, "_run"), (lessons, "run"), (inspect, "inspect")):
        monkeypatch.setattr(*target, pytest.fail)
    assert cli.main(COMMANDS[command]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"normops {command}: error: NORMOPS_BACKEND=triton:") and "TRITON_INTERPRET=1" in line


def test_check_says_it_does_not_use_normops_backend(monkeypatch, capsys):
    monkeypatch.setenv("NORMOPS_BACKEND", "numpy")
    assert cli.main(COMMANDS["check"] + ["--backend", "torch"]) == 0
    assert "NORMOPS_BACKEND=numpy is not used here" in capsys.readouterr().out


def test_ctrl_c_during_the_imports_is_held_then_one_line_and_130(monkeypatch, capsys):
    """SIGINT while the console script imports torch and normops is held (an interrupt inside
    their C-level initialisation could be swallowed or leave numpy half-imported), then reported."""
    import signal
    import types

    import normops_cli

    class Importing(types.ModuleType):
        def __getattr__(self, name):  # `from normops.cli import main`: the interrupt arrives mid-import
            os.kill(os.getpid(), signal.SIGINT)
            return pytest.fail

    monkeypatch.setitem(sys.modules, "normops.cli", Importing("normops.cli"))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore SIGINT)
    try:
        assert normops_cli.main() == 130
        assert one_line(capsys.readouterr().err) == "normops: interrupted"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, before)
