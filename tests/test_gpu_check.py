"""scripts/gpu_check.sh, the prepared GPU check, runs end to end on a CPU with a tiny shape: every
step completes and the summary names each figure (the GPU figures themselves need a GPU)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_end_to_end_on_a_tiny_shape(tmp_path):
    env = {
        **os.environ,
        "KUDA_CHECK_DEVICE": "cpu",
        "KUDA_CHECK_SHAPE": "tiny",
        "KUDA_CHECK_DTYPE": "float32",
        "KUDA_CHECK_LAYERS": "4",
        "KUDA_CHECK_DIR": str(tmp_path / "work"),
        "PY": str(Path(os.sys.executable)),
        "KUDA": str(Path(os.sys.executable).with_name("kuda")),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout
    assert done.returncode == 0, (out + done.stderr)[-4000:]
    assert "!! failed" not in out
    for line in ("kuda  status completed", "rmu   status completed", "ga    status completed"):
        assert line in out, out[-3000:]
    assert "retain leak vs a random change" in out and "projector: l" in out
    assert "wmdp_bio acc 0." in out
    assert "step time KUDA / full fine-tuning" in out
    assert (tmp_path / "work" / "runs" / "kuda" / "checkpoint" / "model.safetensors").exists()
