"""tools/profile_step.py: kernels mapped to source lines through the HLO dump's stack frames."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
try:
  import profile_step
finally:
  sys.path.pop(0)

# The tail of an XLA HLO text dump: instructions name their innermost stack frame; frames chain
# to their callers. fusion.1 comes from model/scan.py called by steps.py; fusion.2 from flax code
# called by model/blocks.py; copy.3 only from steps.py.
_HLO = """HloModule jit_step
ENTRY %main {
  %fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="a" stack_frame_id=2}
  %fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="b" stack_frame_id=4}
  ROOT %copy.3 = f32[4]{0} copy(%fusion.2), metadata={op_name="c" stack_frame_id=1}
}

FileNames
1 "/x/dpmamba_jax/steps.py"
2 "/x/dpmamba_jax/model/scan.py"
3 "/y/flax/nnx/nn/linear.py"
4 "/x/dpmamba_jax/model/blocks.py"
FunctionNames
1 "make_step.<locals>.step"
2 "selective_scan"
3 "Linear.__call__"
4 "MAMambaBlock.__call__"
FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=20 end_line=20 column=1 end_column=2}
3 {file_name_id=3 function_name_id=3 line=30 end_line=30 column=1 end_column=2}
4 {file_name_id=4 function_name_id=4 line=40 end_line=40 column=1 end_column=2}
StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=4 parent_frame_id=2}
4 {file_location_id=3 parent_frame_id=4}
"""
# (parents are printed as id + 1, as XLA writes them: frame 1 is a root, 2 and 3 are called
# from 1, 4 from 3)


def test_hlo_source_lines_picks_the_package_frame(tmp_path):
  path = tmp_path / "module.txt"
  path.write_text(_HLO)
  lines = profile_step.hlo_source_lines(str(path))
  assert lines == {"fusion.1": "scan.py:20 selective_scan",
                   "fusion.2": "blocks.py:40 __call__",  # flax's frame skipped for its caller
                   "copy.3": "steps.py:10 step"}  # no other frame: the innermost


def test_attribute_sums_per_step():
  lines = {"fusion.1": "scan.py:20 f", "fusion.2": "blocks.py:40 g"}
  events = [dict(name="fusion_1", dur=3000.0),  # GPU kernel name: "." as "_"
            dict(name="fusion.1", dur=1000.0),  # CPU op name
            dict(name="kernel", dur=500.0, args={"hlo_op": "fusion.2"}),
            dict(name="ThunkExecutor::Execute", dur=9e6)]  # not an HLO op: left out
  r = profile_step.attribute(events, lines, n_steps=2)
  assert r["by_line"] == [["scan.py:20 f", 2.0, 1.0], ["blocks.py:40 g", 0.25, 0.5]]
  assert r["by_file"] == {"scan.py": 2.0, "blocks.py": 0.25}
  assert r["total_ms"] == pytest.approx(2.25) and r["kernels"] == pytest.approx(1.5)


@pytest.mark.slow
def test_profile_step_cli_on_cpu(tmp_path):
  """The whole tool on the synthetic dataset's predict step: the scan and the convs show up."""
  out = tmp_path / "profile.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "profile_step.py"), "--dataset", "synthetic",
       "--step", "predict", "--batch", "8", "--steps", "1", "--top", "5", "--json", str(out)],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "source line" in proc.stdout
  r = json.loads(out.read_text())
  assert r["step"] == "predict" and r["batch"] == 8 and r["backend"] == "cpu"
  assert r["total_ms"] > 0 and r["kernels"] > 0
  assert {"scan.py", "conv.py"} <= set(r["by_file"])  # model/scan.py, model/conv.py
  assert any(w.startswith("scan.py:") for w, _, _ in r["by_line"])
