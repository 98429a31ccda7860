"""The training process's allocator and the libraries it leaves out (job/startup.py), and how the
program ends, each in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port, make_spec, run_ftjob

# Allocates and frees 64 MiB of tensors, as a training step does its activations, then prints how much
# freed memory glibc's heap keeps for the next step (mallinfo2's fordblks) instead of handing it back.
FREED = """
import ctypes, sys, torch
from job.startup import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "tuned" else None)
blocks = [torch.ones(2**20) for _ in range(16)]
del blocks
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
print(mallinfo2().fordblks // 2**20)
"""


def kept_mib(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run(
        [sys.executable, "-c", FREED, mode],
        cwd=REPO,
        env={**inherited, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    tuned, kept = done.stdout.split()
    return tuned, int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_kept_for_the_next_step():
    assert kept_mib("untuned")[1] < 16  # each block had pages of its own (mmap), unmapped when freed
    tuned, kept = kept_mib("tuned")
    assert tuned == "True" and kept >= 64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072"),
        ("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=4096:glibc.malloc.trim_threshold=131072"),
    ],
)
def test_an_allocator_set_in_the_environment_is_left_alone(name, value):
    tuned, kept = kept_mib("tuned", {name: value})
    assert tuned == "False" and kept < 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_glibc_tunables_other_than_the_two_thresholds_do_not_count_as_a_choice():
    tunables = "glibc.rtld.optional_static_tls=4096:glibc.malloc.arena_max=4"
    tuned, kept = kept_mib("tuned", {"GLIBC_TUNABLES": tunables})
    assert tuned == "True" and kept >= 64


IMPORTS = """
import sys
from job.startup import leave_out_bitsandbytes
if sys.argv[1] != "quantized":
    leave_out_bitsandbytes()
import job.train
from peft.import_utils import is_bnb_available
print(is_bnb_available(), "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None)
"""


@pytest.mark.parametrize("mode", ["quantized", "plain"])
def test_bitsandbytes_is_imported_only_for_a_quantized_run(mode):
    """A quantized run can import bitsandbytes (peft up to 0.21 imports it with its LoRA layers, 0.22
    when a 4-bit model is loaded); a plain run neither can nor does."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS, mode], cwd=REPO, capture_output=True, text=True, check=True
    )
    available, imported = done.stdout.split("\n")[-2].split()
    if mode == "plain":
        assert (available, imported) == ("False", "False")
    else:
        assert available == "True"


# Imports the training code as `ftjob run` does (bitsandbytes comes with peft) and loads a model in 4 bits,
# recording every network lookup and connection; prints them, the `kernels` module, whether transformers
# sees one and whether it swapped the model's layers for Hub kernels.
HUB_KERNELS = """
import logging, sys
logging.basicConfig()
network = []
sys.addaudithook(lambda event, args: event in ("socket.getaddrinfo", "socket.connect") and network.append(args))
import job.train
from job.model.loading import load_model
from job.spec import ModelSpec
from pathlib import Path
import torch
from transformers.utils.import_utils import is_kernels_available
model = load_model(Path(sys.argv[1]), ModelSpec(source=sys.argv[1], quantization="4bit"), torch.device("cpu"))
print(network, sys.modules.get("kernels"), is_kernels_available(), model.use_kernels)
"""


def test_no_library_fetches_kernel_code_from_a_hub(tiny_model_dir):
    """transformers swaps a model's layers for Hub kernels (on GPUs), bitsandbytes fetches one as it is
    imported (on CPUs with AVX512-BF16), transformers one for flash attention without flash-attn: ftjob
    turns the first off and leaves the `kernels` package out, so nothing is fetched, online too, and
    nothing is logged about it."""
    online = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    hub = f"http://127.0.0.1:{free_port()}"  # a closed port: no real hub is asked, even on failure
    done = subprocess.run(
        [sys.executable, "-c", HUB_KERNELS, str(tiny_model_dir)],
        cwd=REPO,
        env={**online, "HF_ENDPOINT": hub, "USE_HUB_KERNELS": "YES"},  # ftjob says no whatever it is
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split("\n")[-2] == "[] None False False"
    assert "kernels-community" not in done.stderr


def test_a_run_imports_bitsandbytes_only_when_it_quantizes(tiny_model_dir, data_files, tmp_path):
    """The real CLI: an unquantized run trains without ever importing bitsandbytes; a 4-bit run has it."""
    for quantization in (None, "4bit"):
        spec = make_spec(
            "lora", model={"source": str(tiny_model_dir), "quantization": quantization}, files=data_files
        )
        spec["train"] |= {"max_steps": 2}
        spec["tracking"] = {"enabled": False}
        spec["output"] = {"uri": str(tmp_path / f"out-{quantization}")}
        path = tmp_path / f"spec-{quantization}.json"
        path.write_text(json.dumps(spec))
        done = run_ftjob("run", str(path), cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        # a refused import is listed too, as bitsandbytes alone: its submodules show it was loaded
        assert any(name.startswith("bitsandbytes.") for name in imported) == (quantization is not None)
        assert not any(name.split(".")[0] == "launch" for name in imported)  # job never imports launch
        assert json.loads((tmp_path / f"out-{quantization}" / "adapter" / "adapter_config.json").read_text())


@pytest.mark.parametrize("how", ["module", "script"])
def test_the_program_ends_without_the_collectors_passes(how, tmp_path):
    """python -m job and the ftjob script freeze the collector after the command (its exit code kept),
    so the interpreter's teardown does not walk every object torch and the rest left behind."""
    probe = "import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
    (tmp_path / "sitecustomize.py").write_text(probe)
    program = (
        [sys.executable, "-m", "job"] if how == "module" else [str(Path(sys.executable).parent / "ftjob")]
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([*program, "schema"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout.rsplit("frozen", 1)[0])
    assert done.stdout.split()[-2:] == ["frozen", "True"]


@pytest.mark.parametrize(("given", "disabled"), [(None, True), ("false", False)])
def test_mlflow_usage_telemetry_is_off_unless_the_user_turns_it_on(given, disabled):
    """MLflow 3 reports usage from any process that imports it, except under CI markers (pytest's own
    among them): the child runs with none of them, as on a cluster."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "FTJOB_CACHE") if k in os.environ}
    if given is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = given
    code = (
        "import io, contextlib; from job.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['schema'])\n"
        "from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(disabled)]
