"""The whole GPU proof in one command (README: Checking a GPU): `./dev gpu-check --out DIR`.

On a machine with a CUDA GPU, in parts that each have their own time limit (a part that fails or
runs out of time never stops the others, and the report is rewritten after every part):

  env        the machine: GPU, driver, torch, triton, nvcc, compute-sanitizer
  build      the extension in place for the visible GPU (setup.py build_ext --inplace), then a check
             that its CUDA kernels load and hold code for this GPU's architecture
  tests      every GPU test (`-m cuda`, and the GPU-aware unmarked files) in parallel pytest shards,
             each test's outcome recorded as it ends (this file is also their pytest plugin)
  sanitizer  compute-sanitizer memcheck, racecheck and initcheck over bench/sanitize_ops.py
  bench      the optimizer-step microbenchmarks on every parameter set (bench/test_step_overhead.py)
  epoch      the quick time-per-epoch table (bench/epoch_time.py --device cuda)

The default budgets add up to under 8 minutes on a 16-core machine. Everything goes to --out, at
most 8 files: gpu_check.json (every part: status, reason, duration, output tail, parsed details),
gpu_check.md (the summary tables), gpu_check.log, pytest_gpu.log, sanitizer.log (full outputs),
step_overhead.json, epoch_time.json and epoch_time.png (the benchmarks' own files).
The exit code is 0 when every part that ran passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORT_JSON, REPORT_MD = "gpu_check.json", "gpu_check.md"
MAIN_LOG, PYTEST_LOG, SANITIZER_LOG = "gpu_check.log", "pytest_gpu.log", "sanitizer.log"
BENCH_FILES = ("step_overhead.json", "epoch_time.json", "epoch_time.png")  # copied from the benchmarks' results folder
OUTPUT_FILES = (REPORT_JSON, REPORT_MD, MAIN_LOG, PYTEST_LOG, SANITIZER_LOG) + BENCH_FILES
MAX_FILES = 8  # what the GPU machine can send back
LOG_CAP = 2_000_000  # characters per log file: a runaway output keeps its head and tail
TAIL_LINES = 40
HEARTBEAT_S = 30.0
KILL_GRACE_S = 5.0
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck")
PARAM_SETS = "resnet18,wrn28_10,vit,pyramidnet110"  # every shape of bench/models.py

# Seconds per part on a 16-core machine with one GPU (compute-sanitizer tools and test shards run
# in parallel inside their part). They add up to 470 s, under the 8 minutes the check has.
BUDGETS = {"env": 20, "build": 120, "tests": 170, "sanitizer": 70, "bench": 50, "epoch": 40}

# pytest shards of the tests part, run at once. The op tests are most of the tests, and their
# Triton cases compile many kernel variants (CPU-bound), so each op file is split by target: the
# ids of the Triton cases hold "triton" (tests/test_ops.py TARGETS). The last shard holds files that
# use the GPU, when there is one, without the `cuda` marker.
BIG_FILES = ("tests/test_ops.py", "tests/test_ops_xsam.py", "tests/test_cuda.py")
GPU_AWARE_FILES = ("tests/test_triton.py", "tests/test_extension.py")
TEST_SHARDS = {
    "ops_cuda": [BIG_FILES[0], "-m", "cuda", "-k", "not triton"],
    "ops_triton": [BIG_FILES[0], "-m", "cuda", "-k", "triton"],
    "xsam_cuda": [BIG_FILES[1], "-m", "cuda", "-k", "not triton"],
    "xsam_triton": [BIG_FILES[1], "-m", "cuda", "-k", "triton"],
    "cuda": [BIG_FILES[2], "-m", "cuda"],
    "other_cuda": ["tests", "-m", "cuda"] + [f"--ignore={f}" for f in BIG_FILES],
    "gpu_aware": list(GPU_AWARE_FILES),
}


@dataclass
class Step:
    """One command of a part; its output goes to the log file ``log`` of the report folder."""

    name: str
    argv: list[str]
    env: dict[str, str | None] = field(default_factory=dict)  # overrides; None removes the variable
    log: str = MAIN_LOG


@dataclass
class Part:
    name: str
    title: str
    budget_s: float
    steps: list[Step]
    parallel: bool = False  # run the steps at once (else one after the other, within the one budget)
    needs_gpu: bool = True
    precheck: Callable[[], str | None] | None = None  # returns why the part is skipped, or None
    summarize: Callable[[dict, Path], None] | None = None  # adds details to the result, may fail it


# ----------------------------------------------------------------------------- the plan


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", name), os.X_OK):
            return os.path.join(root, "bin", name)
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit root, as ./dev finds it: $CUDA_HOME, else where nvcc and libcudart.so are
    (a wrapper nvcc on PATH misleads torch's own guess)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    for root in ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]:
        if any(os.path.exists(os.path.join(root, lib, "libcudart.so")) for lib in ("lib64", "lib")):
            return root
    return None


def build_step(python: str, arch: str | None, jobs: int) -> Step:
    """setup.py build_ext --inplace, as ./dev builds with an existing interpreter: the CUDA kernels
    required, for the visible GPU (TORCH_CUDA_ARCH_LIST unset) unless an arch is named."""
    env: dict[str, str | None] = {
        "FUSED_LESAM_REQUIRE_CUDA": "1",
        "FUSED_LESAM_NO_CUDA": None,
        "FUSED_LESAM_NO_EXTENSION": None,
        "MAX_JOBS": str(jobs),
        "TORCH_CUDA_ARCH_LIST": arch,
    }
    home = cuda_home()
    if home:
        env["CUDA_HOME"] = home
    return Step("build_ext", [python, "setup.py", "build_ext", "--inplace"], env)


def shard_step(python: str, shard: str, args: list[str], work: Path) -> Step:
    """A pytest run with this file as a plugin (`-p bench.gpu_check`, the hooks below): each test's
    outcome is written as it ends, so a shard stopped by its time limit still reports what ran."""
    return Step(
        shard,
        [python, "-m", "pytest", *args, "-q", "-rfEs", "--tb=short", "-p", "no:cacheprovider", "-p", "bench.gpu_check"],
        {RESULTS_ENV: str(work / f"tests-{shard}.jsonl")},
        log=PYTEST_LOG,
    )


def sanitizer_step(tool: str, sanitizer: str, python: str) -> Step:
    # Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees each
    # bucket's true end instead of the end of a larger cached block.
    return Step(
        tool,
        [sanitizer, "--tool", tool, "--error-exitcode", "97", python, "bench/sanitize_ops.py", "--backend", "cuda"],
        {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        log=SANITIZER_LOG,
    )


def make_plan(args, work: Path) -> list[Part]:
    python = args.python
    jobs = os.cpu_count() or 1
    results = {"FUSED_LESAM_BENCH_RESULTS": str(work / "results")}
    sanitizer = find_tool("compute-sanitizer") or "compute-sanitizer"
    plan = [
        Part(
            "env",
            "environment and GPU",
            BUDGETS["env"],
            [Step("probe", [python, __file__, "--probe", "env"])],
            needs_gpu=False,
            summarize=summarize_env,
        ),
        Part(
            "build",
            "extension built for this GPU",
            BUDGETS["build"],
            [build_step(python, args.arch, jobs), Step("verify", [python, __file__, "--probe", "build"])],
            needs_gpu=False,
            summarize=summarize_build,
        ),
        Part(
            "tests",
            "GPU tests",
            BUDGETS["tests"],
            [shard_step(python, shard, shard_args, work) for shard, shard_args in TEST_SHARDS.items()],
            parallel=True,
            summarize=summarize_tests,
        ),
        Part(
            "sanitizer",
            "compute-sanitizer over every CUDA op",
            BUDGETS["sanitizer"],
            [sanitizer_step(tool, sanitizer, python) for tool in SANITIZER_TOOLS],
            parallel=True,
            precheck=lambda: (
                None
                if find_tool("compute-sanitizer")
                else "compute-sanitizer not found (on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin)"
            ),
            summarize=summarize_sanitizer,
        ),
        Part(
            "bench",
            "optimizer-step microbenchmarks",
            BUDGETS["bench"],
            [
                Step(
                    "step_overhead",
                    [
                        python,
                        "-m",
                        "pytest",
                        "bench/test_step_overhead.py",
                        "-q",
                        "-p",
                        "no:cacheprovider",
                        "--device",
                        "cuda",
                        "--sets",
                        PARAM_SETS,
                        "--benchmark-columns=median,min,max",
                        "--benchmark-sort=name",
                    ],
                    results,
                )
            ],
            summarize=lambda result, work: summarize_table(result, "step_overhead.json"),
        ),
        Part(
            "epoch",
            "time per epoch (quick)",
            BUDGETS["epoch"],
            [Step("epoch_time", [python, "bench/epoch_time.py", "--device", "cuda"], results)],
            summarize=lambda result, work: summarize_table(result, "epoch_time.json"),
        ),
    ]
    overrides = parse_timeouts(args.timeout)
    for part in plan:
        part.budget_s = overrides.get(part.name, part.budget_s * args.budget_scale)
    wanted = args.parts.split(",") if args.parts else [p.name for p in plan]
    return [p for p in plan if p.name in wanted]


def parse_timeouts(specs: list[str]) -> dict[str, float]:
    out = {}
    for spec in specs:
        name, _, seconds = spec.partition("=")
        if name not in BUDGETS or not seconds:
            raise ValueError(f"--timeout {spec!r}: expected PART=SECONDS with PART one of {', '.join(BUDGETS)}")
        out[name] = float(seconds)
    return out


def step_env(step: Step) -> dict[str, str]:
    env = dict(os.environ)
    # The children import this checkout's fused_lesam (built in place) from any folder, and run
    # Triton compiled, never through its interpreter.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)
    for key, value in step.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def describe_step(step: Step) -> str:
    unset = [f"-u {k}" for k, v in step.env.items() if v is None]  # env(1) takes its options first
    changes = unset + [f"{k}={shlex.quote(v)}" for k, v in step.env.items() if v is not None]
    return (f"env {' '.join(changes)} " if changes else "") + shlex.join(step.argv)


# ----------------------------------------------------------------------------- running


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def exit_reason(code: int | None) -> str:
    if code is None:
        return "did not start"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (its children too: pytest's spawned ranks, the
    program under compute-sanitizer), SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children may not be
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def run_part(part: Part, work: Path, say: Callable[[str], None]) -> dict:
    """Runs the part's steps within its budget; returns its result (status, reason, steps' outputs)."""
    start = time.monotonic()
    deadline = start + part.budget_s
    steps = [
        dict(
            name=s.name,
            command=describe_step(s),
            log=s.log,
            returncode=None,
            seconds=None,
            timed_out=False,
            output_file=str(work / f"{part.name}.{s.name}.out"),
        )
        for s in part.steps
    ]
    pending = list(zip(part.steps, steps))
    running: list[tuple[subprocess.Popen, dict, float]] = []
    last_beat = start

    def launch(step: Step, record: dict) -> None:
        out = open(record["output_file"], "w")
        try:
            proc = subprocess.Popen(
                step.argv,
                cwd=REPO,
                env=step_env(step),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as err:  # the program is missing or not executable
            out.write(f"could not start {step.argv[0]}: {err}\n")
            record.update(returncode=127, seconds=0.0, error=str(err))
            return
        finally:
            out.close()
        running.append((proc, record, time.monotonic()))

    while pending or running:
        if pending and (part.parallel or not running):
            batch = pending if part.parallel else pending[:1]
            for step, record in batch:
                launch(step, record)
            pending = pending[len(batch) :]
            continue
        now = time.monotonic()
        for proc, record, began in list(running):
            code = proc.poll()
            if code is None and now > deadline:
                kill_group(proc)
                code, record["timed_out"] = proc.wait(), True
            if code is not None:
                record.update(returncode=code, seconds=round(time.monotonic() - began, 1))
                running.remove((proc, record, began))
        if now > deadline and pending:  # out of time before these started
            for _, record in pending:
                record.update(timed_out=True, seconds=0.0)
                Path(record["output_file"]).write_text("not started: the part's budget was spent\n")
            pending = []
        if running and now - last_beat >= HEARTBEAT_S:
            last_beat = now
            for _, record, _ in running:
                last = tail(read_text(record["output_file"]), 1)[:150]
                say(f"    ... {part.name}/{record['name']} {now - start:.0f} s: {last}")
        time.sleep(0.2)

    for record in steps:
        record["tail"] = tail(read_text(record["output_file"]))
    result = dict(
        name=part.name,
        title=part.title,
        budget_s=part.budget_s,
        seconds=round(time.monotonic() - start, 1),
        steps=steps,
        details={},
    )
    timed_out = [r["name"] for r in steps if r["timed_out"]]
    failed = [r for r in steps if not r["timed_out"] and r["returncode"] != 0]
    if timed_out:
        result.update(
            status="timeout", reason=f"budget of {part.budget_s:.0f} s spent; stopped: {', '.join(timed_out)}"
        )
    elif failed:
        result.update(status="fail", reason="; ".join(f"{r['name']}: {exit_reason(r['returncode'])}" for r in failed))
    else:
        result.update(status="pass", reason="")
    return result


def read_text(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def fail(result: dict, why: str) -> None:
    """Marks a part failed for what its summary found (a timeout stays a timeout)."""
    if result["status"] == "pass":
        result["status"] = "fail"
    result["reason"] = "; ".join(filter(None, [result.get("reason"), why]))


# ----------------------------------------------------------------------------- what each part found


def marked_json(text: str, marker: str) -> dict | None:
    for line in text.splitlines():
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1 :])
    return None


def summarize_env(result: dict, work: Path) -> None:
    info = marked_json(read_text(result["steps"][0]["output_file"]), "GPU_CHECK_ENV")
    if info is None:
        return fail(result, "the probe printed no environment")
    result["details"].update(info)
    if not info.get("cuda_available"):
        fail(result, "torch sees no CUDA GPU")


def summarize_build(result: dict, work: Path) -> None:
    info = marked_json(read_text(result["steps"][-1]["output_file"]), "GPU_CHECK_BUILD")
    if info is None:
        return fail(result, "the extension could not be checked")
    result["details"].update(info)
    if info.get("problems"):
        fail(result, "; ".join(info["problems"]))


RESULTS_ENV = "GPU_CHECK_TEST_RESULTS"  # where the plugin hooks append their lines


def pytest_runtest_logstart(nodeid, location):
    """(pytest hook, with -p bench.gpu_check) A test starts: a timed-out shard names what it was running."""
    record_test(dict(test=nodeid, started=True))


def pytest_runtest_logreport(report):
    """(pytest hook) Each phase's outcome: the call's, and a setup or teardown that did not pass."""
    if report.when != "call" and report.passed:
        return
    if report.skipped:
        outcome = "skipped"
        message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(getattr(report, "wasxfail", ""))
        message = message.removeprefix("Skipped: ")
    else:
        outcome = report.outcome if report.when == "call" else "error"
        errors = [line for line in report.longreprtext.splitlines() if line.startswith("E ")]
        message = "\n".join(errors[:5]) if errors else report.longreprtext[-500:]
    record_test(
        dict(
            test=report.nodeid,
            when=report.when,
            outcome=outcome,
            seconds=round(report.duration, 3),
            **({"message": message[:500]} if message else {}),
        )
    )


def record_test(entry: dict) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def parse_test_results(path: Path) -> tuple[dict, list[str]]:
    """Per test (outcome, seconds, message) from the plugin's lines, the worst phase winning, and the
    tests that started but never ended (what a shard was running when it was stopped)."""
    tests: dict[str, dict] = {}
    started: list[str] = []
    for line in read_text(path).splitlines():
        entry = json.loads(line)
        name = entry.pop("test")
        if entry.pop("started", False):
            started.append(name)
            continue
        entry.pop("when")
        known = tests.get(name)
        if known is None or known["outcome"] == "passed":
            tests[name] = dict(entry, seconds=entry["seconds"] + (known["seconds"] if known else 0.0))
    return tests, [name for name in started if name not in tests]


def summarize_tests(result: dict, work: Path) -> None:
    shards, tests, unfinished = {}, {}, []
    for step in result["steps"]:
        shard, running = parse_test_results(work / f"tests-{step['name']}.jsonl")
        tests.update(shard)
        unfinished += running
        shards[step["name"]] = count_outcomes(shard)
        if step["returncode"] == 5:
            fail(result, f"{step['name']}: no tests collected")
    counts = count_outcomes(tests)
    slowest = sorted(tests.items(), key=lambda kv: -kv[1]["seconds"])[:10]
    result["details"].update(
        counts=counts,
        shards=shards,
        tests=tests,
        unfinished=unfinished,
        slowest=[dict(test=k, seconds=v["seconds"]) for k, v in slowest],
    )
    if counts["failed"] or counts["error"]:
        fail(result, f"{counts['failed']} failed, {counts['error']} errors")
    if counts["skipped"]:
        # On a GPU machine no GPU test should skip: say so, without failing (a memory-bound skip is allowed).
        result["details"]["skip_reasons"] = sorted(
            {v.get("message", "") for v in tests.values() if v["outcome"] == "skipped"}
        )


def count_outcomes(tests: dict) -> dict:
    counts = dict(passed=0, failed=0, error=0, skipped=0)
    for test in tests.values():
        counts[test["outcome"]] += 1
    counts["total"] = len(tests)
    return counts


def our_kernels() -> list[str]:
    """The __global__ functions of csrc/cuda/, by name, to tell their errors from torch's own."""
    names = []
    for source in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        names += re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", source.read_text())
    return names


def parse_sanitizer(text: str, kernels: list[str]) -> dict:
    """compute-sanitizer's error summary and the kernels of ours its reports name."""
    summary = re.search(r"ERROR SUMMARY: (\d+) errors?", text)
    named = {k: len(re.findall(rf"^=+\s+at .*\b{k}\b", text, re.M)) for k in kernels}
    covered = re.search(r"^SANITIZE_OPS_COVERED (.*)$", text, re.M)
    return dict(
        errors=int(summary.group(1)) if summary else None,
        errors_in_our_kernels={k: n for k, n in named.items() if n},
        ops_run=covered.group(1).split(",") if covered else [],
    )


def summarize_sanitizer(result: dict, work: Path) -> None:
    kernels = our_kernels()
    tools = {}
    for step in result["steps"]:
        found = parse_sanitizer(read_text(step["output_file"]), kernels)
        tools[step["name"]] = found
        if step["timed_out"]:
            continue
        if found["errors"] is None:
            fail(result, f"{step['name']}: no ERROR SUMMARY in its output")
        elif found["errors"]:
            fail(result, f"{step['name']}: {found['errors']} errors")
        if not found["ops_run"]:
            fail(result, f"{step['name']}: the ops did not run to the end")
    result["details"].update(tools=tools, kernels=kernels)


def summarize_table(result: dict, json_name: str) -> None:
    """The markdown tables the benchmark printed (each with the line before it as its caption), its
    notes on the alpha search, and whether it wrote its JSON."""
    lines = read_text(result["steps"][0]["output_file"]).splitlines()
    tables, caption = [], ""
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            caption = line.strip() or caption
        elif i == 0 or not lines[i - 1].startswith("|"):
            tables.append(dict(caption=caption, lines=[line]))
        else:
            tables[-1]["lines"].append(line)
    result["details"]["tables"] = tables
    result["details"]["notes"] = [line for line in lines if "alpha search" in line]
    if result["status"] == "pass" and not any(line.startswith("wrote ") and json_name in line for line in lines):
        fail(result, f"{json_name} was not written")


# ----------------------------------------------------------------------------- probes (run as children)


def probe_env() -> int:
    info = dict(host=platform.node(), python=platform.python_version(), cpu_count=os.cpu_count())
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                gpu=props.name,
                gpu_count=torch.cuda.device_count(),
                capability=f"{props.major}.{props.minor}",
                gpu_memory_gib=round(props.total_memory / 2**30, 1),
                sms=props.multi_processor_count,
            )
    except Exception as err:  # noqa: BLE001 (reported, whatever it is)
        info["torch_error"] = repr(err)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        info["triton"] = f"not importable: {err!r}"
    for key, argv in (
        ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        ("nvcc", [find_tool("nvcc") or "nvcc", "--version"]),
        ("compute_sanitizer", [find_tool("compute-sanitizer") or "compute-sanitizer", "--version"]),
    ):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
            info[key] = out.splitlines()[-1] if out else ""
        except (OSError, subprocess.TimeoutExpired) as err:
            info[key] = f"not available: {err}"
    print(json.dumps(info, indent=1))
    print("GPU_CHECK_ENV " + json.dumps(info))
    return 0


FATBIN_MAGIC = 0xBA55ED50  # the header of each fat binary nvcc embeds in a shared object
FATBIN_KINDS = {1: "ptx", 2: "sass"}


def fatbin_archs(path: str) -> dict[str, list[int]]:
    """The GPU architectures (e.g. 90 for sm_90) of the code in a shared object's fat binaries:
    machine code ("sass") and PTX, read from the fat binary headers (what cuobjdump --list-elf and
    --list-ptx show, without needing cuobjdump). Layout: a 16-byte header (magic, version, header
    size, size of the entries), then entries of a header (kind, header size, payload size, ...,
    arch at byte 28) and their payload."""
    data = Path(path).read_bytes()
    found: dict[str, set[int]] = {"sass": set(), "ptx": set()}
    at = data.find(struct.pack("<I", FATBIN_MAGIC))
    while at >= 0:
        header_size = struct.unpack_from("<H", data, at + 6)[0]
        (size,) = struct.unpack_from("<Q", data, at + 8)
        entry, end = at + header_size, at + header_size + size
        while entry + 32 <= min(end, len(data)):
            kind, entry_header, payload = (
                *struct.unpack_from("<HxxI", data, entry),
                struct.unpack_from("<Q", data, entry + 8)[0],
            )
            if kind in FATBIN_KINDS:
                found[FATBIN_KINDS[kind]].add(struct.unpack_from("<I", data, entry + 28)[0])
            if entry_header == 0:
                break
            entry += entry_header + payload
        at = data.find(struct.pack("<I", FATBIN_MAGIC), max(end, at + 4))
    return {kind: sorted(archs) for kind, archs in found.items()}


def probe_build() -> int:
    """The extension this checkout imports: its CUDA kernels registered, and GPU code for the
    visible GPU's architecture in it."""
    import torch

    import fused_lesam
    from fused_lesam.backends import extension_error

    info: dict = dict(problems=[], package=os.path.dirname(fused_lesam.__file__))
    if not info["package"].startswith(str(REPO)):
        info["problems"].append(f"fused_lesam imported from {info['package']}, not from this checkout")
    why = extension_error()
    if why:
        info["problems"].append(why)
    else:
        import fused_lesam._C as extension

        from fused_lesam.backends import compiled

        info["extension"] = extension.__file__
        info["ops"] = list(compiled._OPS)
        if not compiled.has_kernels("CUDA"):
            info["problems"].append("the extension has no CUDA kernels")
        info["archs"] = fatbin_archs(extension.__file__)
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if 10 * major + minor not in info["archs"]["sass"]:
                info["problems"].append(f"no sm_{major}{minor} code in the extension (it has {info['archs']})")
    info["backends"] = {name: (why or "available") for name, why in fused_lesam.available_backends().items()}
    for name in ("cuda", "triton"):
        if torch.cuda.is_available() and info["backends"].get(name) != "available":
            info["problems"].append(f"backend {name}: {info['backends'].get(name)}")
    print(json.dumps(info, indent=1))
    print("GPU_CHECK_BUILD " + json.dumps(info))
    return 1 if info["problems"] else 0


# ----------------------------------------------------------------------------- the report


def cap(text: str, limit: int = LOG_CAP) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + f"\n[... {len(text) - limit} characters cut ...]\n" + text[-half:]


def append_logs(out: Path, result: dict) -> None:
    """Each step's whole output into its log file of the report folder, under a header."""
    by_log: dict[str, list[str]] = {}
    for step in result["steps"]:
        by_log.setdefault(step["log"], []).append(
            f"===== {result['name']}/{step['name']}: "
            f"{exit_reason(step['returncode']) if not step['timed_out'] else 'timed out'}"
            f" after {step['seconds']} s\n$ {step['command']}\n{read_text(step['output_file'])}\n"
        )
    for log, chunks in by_log.items():
        path = out / log
        path.write_text(cap(read_text(path) + "".join(chunks)))


def write_report(out: Path, meta: dict, plan: list[Part], results: dict[str, dict]) -> None:
    """gpu_check.json and gpu_check.md, with every planned part (pending ones too): written after
    every part, so an interrupted check still leaves a report."""
    parts = [
        public(results.get(p.name))
        or dict(
            name=p.name,
            title=p.title,
            status="pending",
            reason="not run yet",
            budget_s=p.budget_s,
            seconds=None,
            steps=[],
            details={},
        )
        for p in plan
    ]
    payload = dict(
        meta,
        parts=parts,
        passed=all(p["status"] in ("pass", "skipped") for p in parts) and any(p["status"] == "pass" for p in parts),
    )
    (out / REPORT_JSON).write_text(json.dumps(payload, indent=1, default=str))
    (out / REPORT_MD).write_text(markdown(meta, parts))


def public(result: dict | None) -> dict | None:
    """A part's result as reported: without the paths of the temporary folder."""
    if result is None:
        return None
    return dict(result, steps=[{k: v for k, v in step.items() if k != "output_file"} for step in result["steps"]])


def markdown(meta: dict, parts: list[dict]) -> str:
    lines = [f"# GPU check, {meta.get('started', '')}", ""]
    env = next((p["details"] for p in parts if p["name"] == "env" and p["details"]), {})
    if env:
        lines += [
            f"{env.get('gpu', 'no GPU')} (sm {env.get('capability', '?')}, {env.get('gpu_memory_gib', '?')} GiB), "
            f"driver {env.get('driver', '?')}; {env.get('cpu_count')} CPUs; torch {env.get('torch')} "
            f"(CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, Python {env.get('python')}",
            "",
        ]
    lines += ["| part | status | seconds (budget) | note |", "| --- | --- | ---: | --- |"]
    for p in parts:
        seconds = "" if p["seconds"] is None else f"{p['seconds']:.1f}"
        lines.append(
            f"| {p['name']}: {p['title']} | {p['status'].upper() if p['status'] != 'pass' else 'pass'} "
            f"| {seconds} ({p['budget_s']:.0f}) | {p.get('reason', '')} |"
        )
    lines.append(f"\nTotal {meta.get('seconds', '?')} s.")
    for p in parts:
        lines += section(p)
    return "\n".join(lines) + "\n"


def section(p: dict) -> list[str]:
    d, name = p["details"], p["name"]
    lines = []
    if name == "build" and d:
        archs = d.get("archs", {})
        lines += [
            f"Extension {d.get('extension', '(none)')}; "
            f"GPU code: sm {archs.get('sass', '?')}, PTX {archs.get('ptx', '?')}; "
            f"backends: " + ", ".join(f"{k} {v}" for k, v in d.get("backends", {}).items())
        ]
    elif name == "tests" and d.get("counts"):
        c = d["counts"]
        lines += [
            f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped "
            f"of {c['total']} ({PYTEST_LOG} has the output)",
            "",
            "| shard | passed | failed | errors | skipped |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {s} | {n['passed']} | {n['failed']} | {n['error']} | {n['skipped']} |" for s, n in d["shards"].items()
        ]
        bad = [(t, v) for t, v in d["tests"].items() if v["outcome"] in ("failed", "error")]
        if bad:
            lines += ["", "Failures:"] + [
                f"- `{t}`: {v.get('message', '').splitlines()[0] if v.get('message') else ''}" for t, v in bad[:30]
            ]
        if d.get("unfinished"):
            lines += ["", "Running when stopped: " + ", ".join(f"`{t}`" for t in d["unfinished"])]
        if d.get("slowest"):
            lines += ["", "Slowest: " + ", ".join(f"`{t['test']}` {t['seconds']:.1f} s" for t in d["slowest"][:5])]
        if d.get("skip_reasons"):
            lines += ["", "Skipped (should not be, on a GPU): " + "; ".join(d["skip_reasons"][:10])]
    elif name == "sanitizer" and d.get("tools"):
        lines += ["| tool | errors | in our kernels | ops run |", "| --- | ---: | --- | --- |"]
        for tool, t in d["tools"].items():
            ours = ", ".join(f"{k} {n}" for k, n in t["errors_in_our_kernels"].items()) or "none"
            lines.append(
                f"| {tool} | {'?' if t['errors'] is None else t['errors']} | {ours} | {', '.join(t['ops_run'])} |"
            )
    elif name in ("bench", "epoch") and d.get("tables"):
        for table in d["tables"]:
            lines += [table["caption"], ""] + table["lines"] + [""]
        lines += d.get("notes", [])
    if p["status"] not in ("pass", "pending", "skipped") and p["steps"]:
        for step in p["steps"]:
            if step["timed_out"] or step["returncode"] != 0:
                lines += [
                    "",
                    f"`{step['name']}` ({'timed out' if step['timed_out'] else exit_reason(step['returncode'])}), "
                    "last lines:",
                    "```",
                    tail(step.get("tail", ""), 15),
                    "```",
                ]
    if not lines:
        return []
    return ["", f"## {p['name']}: {p['title']}", ""] + lines


def collect_bench_files(work: Path, out: Path) -> None:
    for name in BENCH_FILES:
        source = work / "results" / name
        if source.exists():
            shutil.copyfile(source, out / name)


def execute(plan: list[Part], out: Path, work: Path, meta: dict, say: Callable[[str], None] = print) -> dict[str, dict]:
    """Runs the plan part by part, writing the report after each; returns the parts' results."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a previous check's files would mix with this one's
        (out / name).unlink(missing_ok=True)
    results: dict[str, dict] = {}
    start = time.monotonic()
    write_report(out, meta, plan, results)
    for index, part in enumerate(plan, 1):
        label = f"[{index}/{len(plan)}] {part.name}"
        env = results.get("env", {}).get("details", {})
        skip = None
        if part.needs_gpu and "env" in results and not env.get("cuda_available"):
            skip = "no CUDA GPU visible to torch (see the env part)"
        elif part.precheck:
            skip = part.precheck()
        if skip:
            results[part.name] = dict(
                name=part.name,
                title=part.title,
                status="skipped",
                reason=skip,
                budget_s=part.budget_s,
                seconds=0.0,
                steps=[],
                details={},
            )
            say(f"{label}: skipped, {skip}")
        else:
            say(
                f"{label}: {part.title} (budget {part.budget_s:.0f} s, {len(part.steps)} "
                f"{'parallel ' if part.parallel and len(part.steps) > 1 else ''}"
                f"step{'s' if len(part.steps) > 1 else ''})"
            )
            try:
                result = run_part(part, work, say)
                if part.summarize:
                    try:
                        part.summarize(result, work)
                    except Exception:  # noqa: BLE001 (a broken summary fails this part only)
                        result.update(
                            status="error",
                            reason="summarizing the output failed: " + traceback.format_exc().strip().splitlines()[-1],
                        )
                        result["traceback"] = traceback.format_exc()
                append_logs(out, result)
            except Exception:  # noqa: BLE001 (the runner's own failure: reported, and the next part runs)
                result = dict(
                    name=part.name,
                    title=part.title,
                    status="error",
                    budget_s=part.budget_s,
                    seconds=None,
                    steps=[],
                    details={},
                    traceback=traceback.format_exc(),
                    reason="the runner failed: " + traceback.format_exc().strip().splitlines()[-1],
                )
            results[part.name] = result
            say(
                f"{label}: {result['status']} in {result['seconds'] if result['seconds'] is not None else '?'} s"
                + (f", {result['reason']}" if result.get("reason") else "")
            )
        collect_bench_files(work, out)
        meta["seconds"] = round(time.monotonic() - start, 1)
        write_report(out, meta, plan, results)
    return results


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="./dev gpu-check",
        description=__doc__.splitlines()[0],
        epilog="parts: " + ", ".join(f"{k} ({v} s)" for k, v in BUDGETS.items()),
    )
    parser.add_argument("--out", required=True, help="folder for the report (at most 8 files; created if missing)")
    parser.add_argument("--parts", default="", help="comma-separated subset of the parts, in the order above")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="one part's time budget (repeatable); overrides --budget-scale for it",
    )
    parser.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST for the build (default: unset, the visible GPU's)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every step (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its commands; run nothing")
    parser.add_argument("--probe", choices=["env", "build"], help=argparse.SUPPRESS)  # the parts' own children
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts.split(",") if p and p not in BUDGETS]
    if unknown:
        parser.error(f"unknown parts {unknown}; the parts are {', '.join(BUDGETS)}")
    try:
        parse_timeouts(args.timeout)
    except ValueError as err:
        parser.error(str(err))
    if args.budget_scale <= 0:
        parser.error("--budget-scale must be positive")
    return args


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--probe" in argv:  # a probe needs no --out
        kind = argv[argv.index("--probe") + 1]
        return probe_env() if kind == "env" else probe_build()
    args = parse_args(argv)
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(tmp)
        plan = make_plan(args, work)
        total = sum(p.budget_s for p in plan)
        if args.dry_run:
            print(f"plan: {len(plan)} parts, budgets {total:.0f} s in all; report to {out}")
            for part in plan:
                mode = "in parallel" if part.parallel and len(part.steps) > 1 else "in turn"
                print(f"{part.name}: {part.title}, budget {part.budget_s:.0f} s, steps {mode}:")
                for step in part.steps:
                    print(f"    [{step.name}] {describe_step(step).replace(str(work), '$WORK')}")
            print("($WORK: a temporary folder for the steps' outputs)")
            return 0
        meta = dict(
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            argv=argv,
            repo=str(REPO),
            budgets_s=total,
            files=list(OUTPUT_FILES),
        )
        print(
            f"gpu-check: {len(plan)} parts ({', '.join(p.name for p in plan)}), budgets {total:.0f} s in all; "
            f"report to {out}",
            flush=True,
        )
        results = execute(plan, out, work, meta, say=lambda line: print(line, flush=True))
    ok = all(r["status"] in ("pass", "skipped") for r in results.values())
    failed = ", ".join(n for n, r in results.items() if r["status"] not in ("pass", "skipped"))
    print(
        f"gpu-check: {'all parts passed' if ok else 'FAILED: ' + failed}; report {out / REPORT_MD}",
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
