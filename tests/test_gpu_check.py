"""`./dev gpu-check` (bench/gpu_check.py) without a GPU: its arguments, the plan it would run, the
build it would ask for, the report (written whatever the parts do: a crash, a timeout, a broken
summary), the parsers of pytest's and compute-sanitizer's output, and bench/sanitize_ops.py's
coverage of every op, run here on the C++ kernels."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gpu_check
import pytest
import sanitize_ops
import torch
from gpu_check import Part, Step

PYTHON = sys.executable


def run_main(argv, capsys):
    code = gpu_check.main(argv)
    return code, capsys.readouterr().out


def test_help_names_every_option_and_part(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--parts", "--budget-scale", "--timeout", "--dry-run", "--arch"):
        assert option in out
    for part in gpu_check.BUDGETS:
        assert part in out


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "--out"),
        (["--out", "x", "--parts", "tests,nope"], "unknown parts ['nope']"),
        (["--out", "x", "--timeout", "tests"], "PART=SECONDS"),
        (["--out", "x", "--budget-scale", "0"], "must be positive"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_default_budgets_fit_in_eight_minutes():
    assert sum(gpu_check.BUDGETS.values()) < 8 * 60


def test_dry_run_prints_every_part_and_runs_nothing(tmp_path, capsys, monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("a dry run started a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(subprocess, "run", no_process)
    code, out = run_main(["--out", str(tmp_path / "report"), "--dry-run"], capsys)
    assert code == 0 and not (tmp_path / "report").exists()
    assert f"budgets {sum(gpu_check.BUDGETS.values())} s in all" in out
    for part, budget in gpu_check.BUDGETS.items():
        assert f"\n{part}: " in out and f"budget {budget} s" in out
    for tool in gpu_check.SANITIZER_TOOLS:
        assert f"--tool {tool} " in out
    assert "bench/sanitize_ops.py --backend cuda" in out and "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in out
    assert "--sets resnet18,wrn28_10,vit,pyramidnet110" in out and "bench/epoch_time.py --device cuda" in out
    assert "setup.py build_ext --inplace" in out and "-m cuda" in out


def test_parts_subset_and_budgets(tmp_path, capsys):
    code, out = run_main(
        [
            "--out",
            str(tmp_path),
            "--dry-run",
            "--parts",
            "epoch,tests",
            "--budget-scale",
            "0.5",
            "--timeout",
            "epoch=7",
        ],
        capsys,
    )
    assert code == 0
    listed = [line.split(":")[0] for line in out.splitlines() if line and not line.startswith((" ", "plan", "("))]
    assert listed == ["tests", "epoch"]  # the plan's order, not the argument's
    assert f"budget {gpu_check.BUDGETS['tests'] * 0.5:.0f} s" in out and "budget 7 s" in out


def plan_of(argv, tmp_path):
    return {p.name: p for p in gpu_check.make_plan(gpu_check.parse_args(["--out", str(tmp_path)] + argv), tmp_path)}


def test_build_is_for_the_visible_gpu_with_the_cuda_kernels_required(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")  # left over from elsewhere: must not reach the build
    monkeypatch.setenv("FUSED_LESAM_NO_CUDA", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    step = plan_of([], tmp_path)["build"].steps[0]
    env = gpu_check.step_env(step)
    assert step.argv == [PYTHON, "setup.py", "build_ext", "--inplace"]
    assert "TORCH_CUDA_ARCH_LIST" not in env and "FUSED_LESAM_NO_CUDA" not in env and "TRITON_INTERPRET" not in env
    assert env["FUSED_LESAM_REQUIRE_CUDA"] == "1" and env["MAX_JOBS"] == str(os.cpu_count())
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(gpu_check.REPO)
    named = gpu_check.step_env(plan_of(["--arch", "9.0"], tmp_path)["build"].steps[0])
    assert named["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_the_built_extension_is_checked_for_gpu_code(capsys):
    """The build part's check, on this machine's build: with CUDA kernels it finds the machine code
    of every arch the build record names (CI builds setup.py's default without a GPU: 7.5 to 12.0,
    PTX of the newest); without, it says so."""
    from fused_lesam import build_info
    from fused_lesam.backends import compiled

    code = gpu_check.probe_build()
    info = gpu_check.marked_json(capsys.readouterr().out, "GPU_CHECK_BUILD")
    assert info["ops"] == list(compiled._OPS)
    if compiled.has_kernels("CUDA"):
        assert info["problems"] == [] and code == 0  # on a GPU: code for its architecture among them
        if not torch.cuda.is_available():
            built = build_info.record()["cuda_archs"]  # e.g. "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
            sass = sorted(int(arch.replace("+PTX", "").replace(".", "")) for arch in built.split(";"))
            assert info["archs"] == dict(sass=sass, ptx=[sass[-1]] if built.endswith("+PTX") else [])
            if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # setup.py's default: the archs users train on
                assert {75, 80, 86, 89, 90} <= set(sass) and built.endswith("+PTX")
    else:
        assert info["archs"] == {"sass": [], "ptx": []}
        assert "the extension has no CUDA kernels" in info["problems"] and code == 1


def python_step(name, code, log=gpu_check.MAIN_LOG):
    return Step(name, [PYTHON, "-c", textwrap.dedent(code)], log=log)


def part(name, *steps, budget=20.0, parallel=False, summarize=None):
    return Part(name, f"the {name} part", budget, list(steps), parallel=parallel, needs_gpu=False, summarize=summarize)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def broken_summary(result, work):
    raise KeyError("no such detail")


def test_a_crash_a_timeout_and_a_broken_part_never_stop_the_others_or_the_report(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    plan = [
        part(
            "crash",
            python_step(
                "s", "import os, signal; print('about to crash', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
            ),
        ),
        part(
            "slow",
            python_step(
                "s",
                f"""
            import subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            open({str(pidfile)!r}, "w").write(str(child.pid))
            print("started", flush=True)
            time.sleep(60)""",
            ),
            python_step("never", "print('NEVER' + 'RAN')"),
            budget=2.0,
        ),
        part("summary", python_step("s", "print('fine')"), summarize=broken_summary),
        part("runner", Step("s", [PYTHON, "-c", None])),  # Popen itself raises (not an OSError)
        part("two", python_step("a", "print('a')"), python_step("b", "import sys; sys.exit(3)"), parallel=True),
        part("fine", python_step("s", "print('all good')")),
        part("unreached", python_step("s", "print('x')")),
    ]
    out, work = tmp_path / "report", tmp_path / "work"
    work.mkdir()
    (out / "gpu_check.log").parent.mkdir()
    (out / "gpu_check.log").write_text("a previous check's log\n")
    said = []
    start = time.monotonic()
    results = gpu_check.execute(plan[:-1], out, work, dict(started="now"), say=said.append)
    assert time.monotonic() - start < 15
    status = {name: (r["status"], r["reason"]) for name, r in results.items()}
    assert status["crash"] == ("fail", "s: killed by signal SIGSEGV")
    assert status["slow"][0] == "timeout" and "stopped: s, never" in status["slow"][1]
    assert not alive(int(pidfile.read_text())), "the timed-out step's child process must be killed too"
    assert status["summary"][0] == "error" and "KeyError" in status["summary"][1]
    assert status["runner"][0] == "error" and "the runner failed" in status["runner"][1]
    assert status["two"] == ("fail", "b: exit code 3")
    assert status["fine"] == ("pass", "")
    assert any(line.startswith("[6/6] fine: pass") for line in said)

    gpu_check.write_report(out, dict(started="now"), plan, results)  # with a part that never ran
    report = json.loads((out / gpu_check.REPORT_JSON).read_text())
    assert [p["name"] for p in report["parts"]] == [p.name for p in plan]
    assert report["parts"][-1]["status"] == "pending" and report["passed"] is False
    md = (out / gpu_check.REPORT_MD).read_text()
    for p in plan:
        assert f"| {p.name}: the {p.name} part |" in md
    assert "about to crash" in md  # the failing step's last lines
    log = (out / gpu_check.MAIN_LOG).read_text()
    assert "a previous check's log" not in log and "all good" in log and "NEVERRAN" not in log
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= gpu_check.MAX_FILES and set(files) <= set(gpu_check.OUTPUT_FILES)


def test_gpu_parts_are_skipped_without_a_gpu(tmp_path):
    env = part(
        "env",
        python_step("s", 'print("GPU_CHECK_ENV " + \'{"cuda_available": false, "torch": "x"}\')'),
        summarize=gpu_check.summarize_env,
    )
    gpu = Part("tests", "GPU tests", 5.0, [python_step("s", "raise SystemExit('must not run')")])
    results = gpu_check.execute([env, gpu], tmp_path / "r", tmp_path, {}, say=lambda line: None)
    assert results["env"]["status"] == "fail" and "no CUDA GPU" in results["env"]["reason"]
    assert results["tests"]["status"] == "skipped" and results["tests"]["steps"] == []


def test_pytest_results_are_collected_per_test(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'one is not two'\n\n"
        "@pytest.mark.skip(reason='needs memory')\ndef test_skip():\n    pass\n"
    )
    tests_part = Part(
        "tests",
        "GPU tests",
        60.0,
        [gpu_check.shard_step(PYTHON, "sample", [str(tests)], tmp_path)],
        summarize=gpu_check.summarize_tests,
    )
    result = gpu_check.run_part(tests_part, tmp_path, print)
    gpu_check.summarize_tests(result, tmp_path)
    details = result["details"]
    assert details["counts"] == dict(passed=1, failed=1, error=0, skipped=1, total=3)
    assert result["status"] == "fail" and "1 failed, 0 errors" in result["reason"]
    bad = next(v for k, v in details["tests"].items() if k.endswith("::test_bad"))
    assert bad["outcome"] == "failed" and "one is not two" in bad["message"] and details["unfinished"] == []
    assert details["skip_reasons"] == ["needs memory"]
    md = gpu_check.markdown({}, [gpu_check.public(result)])
    assert "1 passed, 1 failed, 0 errors, 1 skipped of 3" in md and "test_bad`: " in md


def test_a_stopped_shard_still_reports_what_ran_and_what_was_running(tmp_path):
    lines = [
        dict(test="t.py::test_a", started=True),
        dict(test="t.py::test_a", when="call", outcome="passed", seconds=0.5),
        dict(test="t.py::test_b", started=True),
        dict(test="t.py::test_b", when="setup", outcome="error", seconds=0.1),
        dict(test="t.py::test_c", started=True),
        dict(test="t.py::test_c", when="call", outcome="passed", seconds=1.0),
        dict(test="t.py::test_c", when="teardown", outcome="error", seconds=0.2, message="E   leak"),
        dict(test="t.py::test_d", started=True),
    ]  # killed here
    path = tmp_path / "shard.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tests, running = gpu_check.parse_test_results(path)
    assert {name: t["outcome"] for name, t in tests.items()} == {
        "t.py::test_a": "passed",
        "t.py::test_b": "error",
        "t.py::test_c": "error",
    }
    assert tests["t.py::test_c"] == dict(outcome="error", seconds=1.2, message="E   leak")
    assert running == ["t.py::test_d"]


SANITIZER_CLEAN = """========= COMPUTE-SANITIZER
sanitize_ops: backend cuda on cuda, 52 bucket cases per op
SANITIZE_OPS_COVERED perturb_,restore_,sq_norm
========= ERROR SUMMARY: 0 errors
"""
SANITIZER_ERRORS = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at void perturb_kernel<float, float>(float *, const float *, float *, long, bool)+0x1f0 in bucket_ops.cu:231
=========     by thread (3,0,0) in block (0,0,0)
========= Uninitialized __global__ memory read of size 4 bytes
=========     at void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, float)+0x80
SANITIZE_OPS_COVERED perturb_,restore_,sq_norm
========= ERROR SUMMARY: 2 errors
"""  # noqa: E501 (a sanitizer report as printed)


def test_sanitizer_reports_are_parsed():
    kernels = gpu_check.our_kernels()
    assert {"perturb_kernel", "restore_kernel", "sq_partials_kernel"} <= set(kernels)
    clean = gpu_check.parse_sanitizer(SANITIZER_CLEAN, kernels)
    assert clean == dict(errors=0, errors_in_our_kernels={}, ops_run=["perturb_", "restore_", "sq_norm"])
    errors = gpu_check.parse_sanitizer(SANITIZER_ERRORS, kernels)
    assert errors["errors"] == 2 and errors["errors_in_our_kernels"] == {"perturb_kernel": 1}
    assert gpu_check.parse_sanitizer("Segmentation fault\n", kernels)["errors"] is None


@pytest.mark.parametrize(
    "output,status", [(SANITIZER_CLEAN, "pass"), (SANITIZER_ERRORS, "fail"), ("crashed\n", "fail")]
)
def test_sanitizer_part_fails_on_any_error(tmp_path, output, status):
    step = python_step("memcheck", f"print({output!r})", log=gpu_check.SANITIZER_LOG)
    sanitizer = part("sanitizer", step, summarize=gpu_check.summarize_sanitizer)
    result = gpu_check.run_part(sanitizer, tmp_path, print)
    gpu_check.summarize_sanitizer(result, tmp_path)
    assert result["status"] == status


def test_benchmark_tables_keep_their_captions(tmp_path):
    printed = (
        "Optimizer step on cuda, base SGD\n| set | backend |\n| --- | --- |\n| vit | cuda |\n(overhead = ...)\n\n"
        "FusedXSAM (one ascent step) against the loop\n| set | backend |\n| --- | --- |\n| vit | triton |\n"
        "wrote /tmp/x/step_overhead.json\n"
    )
    bench = part("bench", python_step("s", f"print({printed!r})"))
    result = gpu_check.run_part(bench, tmp_path, print)
    gpu_check.summarize_table(result, "step_overhead.json")
    assert result["status"] == "pass"
    assert [t["caption"] for t in result["details"]["tables"]] == [
        "Optimizer step on cuda, base SGD",
        "FusedXSAM (one ascent step) against the loop",
    ]
    gpu_check.summarize_table(result, "epoch_time.json")
    assert result["status"] == "fail" and "epoch_time.json was not written" in result["reason"]


def test_sanitize_ops_runs_every_op_of_the_extension(capsys):
    from fused_lesam.backends import compiled

    assert sanitize_ops.main(["--backend", "cpp"]) == 0
    covered = gpu_check.parse_sanitizer(capsys.readouterr().out, [])["ops_run"]
    assert set(covered) == set(compiled._OPS)


def test_sanitize_ops_runs_the_fused_base_updates_of_the_spec(capsys, monkeypatch):
    monkeypatch.setattr(sanitize_ops, "SIZES", [17])
    assert sanitize_ops.main(["--backend", "torch"]) == 0
    covered = gpu_check.parse_sanitizer(capsys.readouterr().out, [])["ops_run"]
    assert {"sgd_step_", "adam_step_"} <= set(covered)


def test_sanitize_ops_refuses_an_op_without_a_runner(capsys, monkeypatch):
    monkeypatch.setattr(sanitize_ops, "SIZES", [17])
    monkeypatch.delitem(sanitize_ops.RUNNERS, "xsam_dots")
    assert sanitize_ops.main(["--backend", "cpp"]) == 3
    assert "NOT COVERED (add a runner to bench/sanitize_ops.py): xsam_dots" in capsys.readouterr().out
