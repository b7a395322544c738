"""The TensorRT LoRA layer (engines/refit.py) against fakes of the TensorRT calls it makes; TensorRT cannot be
installed here (FACTS.md)."""

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from linfusion.engines.refit import RefitError, refit_engine, refitting_runner
from onnx import helper, numpy_helper


class FakeRefitter:
    """TensorRT's Refitter as the layer uses it: refittable names, set by name, coupled weights, refit."""

    def __init__(self, engine, logger):
        self.engine, self.logger, self.set = engine, logger, {}

    def get_all_weights(self):
        return list(self.engine.weights)

    def set_named_weights(self, name, weights):
        if weights.shape != self.engine.weights[name].shape:
            return False
        self.set[name] = weights
        return True

    def get_missing_weights(self):
        touched = set(self.set)
        return [n for group in self.engine.coupled if touched & set(group) for n in group if n not in touched]

    def refit_cuda_engine(self):
        if self.engine.fail:
            return False
        for name, value in self.set.items():
            self.engine.weights[name] = np.array(value)
        return True


class FakeEngine:
    def __init__(self, fail=False):
        self.refittable = True
        self.weights = {"w_q": np.zeros((4, 4), np.float32), "w_k": np.zeros((4, 4), np.float32),
                        "w_out": np.zeros((4, 2), np.float32)}
        self.coupled = [("w_q", "w_k")]  # e.g. fused into one layer by TensorRT: refitted together
        self.fail = fail


TRT = SimpleNamespace(Refitter=FakeRefitter, Weights=lambda array: array)


def test_refit_sets_weights_and_the_ones_tensorrt_needs_with_them():
    engine, asked = FakeEngine(), []

    def base(names):
        asked.append(list(names))
        return {n: np.full((4, 4), 7.0, np.float32) for n in names}

    new_q = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert refit_engine(TRT, engine, {"w_q": new_q}, base, logger=None) == 2
    assert asked == [["w_k"]]
    assert np.array_equal(engine.weights["w_q"], new_q) and (engine.weights["w_k"] == 7).all()
    assert (engine.weights["w_out"] == 0).all()


@pytest.mark.parametrize("problem, words", [
    ("folded", "no refittable weight val_9 .* fuse this LoRA at export"),
    ("shape", "refused the new values of weight w_out"),
    ("failed", "could not refit the engine"),
    ("fixed", "not refittable; rebuild with linfusion-build --refittable")])
def test_refit_failures_are_one_line(problem, words):
    engine = FakeEngine(fail=problem == "failed")
    engine.refittable = problem != "fixed"
    weights = {"val_9" if problem == "folded" else "w_out": np.ones((4, 2 if problem != "shape" else 3), np.float32)}
    with pytest.raises(RefitError, match=words) as info:
        refit_engine(TRT, engine, weights, lambda names: {}, logger=None)
    assert "\n" not in str(info.value)


def test_refitting_runner_refits_a_second_engine_and_restores_earlier_weights(tmp_path):
    """The live engine is left alone (requests in flight finish on it); weights an earlier LoRA changed and
    the new set does not touch come back from the export's ONNX file."""
    rng = np.random.default_rng(0)
    w_out, w_k = rng.standard_normal((4, 2)).astype(np.float32), rng.standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w_out"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(w_out, "w_out"), numpy_helper.from_array(w_k, "w_k")])
    (tmp_path / "unet").mkdir()
    onnx.save(helper.make_model(graph), str(tmp_path / "unet" / "model.onnx"))
    spec = SimpleNamespace(path="unet/model.onnx")

    loads = []

    class Backend:
        trt, trt_logger = TRT, None

        def load(self, directory, name, component_spec):
            loads.append(name)
            return SimpleNamespace(engine=FakeEngine(), name=name)

    live = SimpleNamespace(name="unet", backend=Backend(), engine=FakeEngine(),
                           engine_spec=SimpleNamespace(refittable=True))
    new_q = np.ones((4, 4), np.float32)
    new = refitting_runner(live, tmp_path, spec, {"w_q": new_q}, restore={"w_out"})
    assert loads == ["unet"] and new is not live and (live.engine.weights["w_q"] == 0).all()
    assert np.array_equal(new.engine.weights["w_out"], w_out) and np.array_equal(new.engine.weights["w_q"], new_q)
    assert np.array_equal(new.engine.weights["w_k"], w_k)  # coupled with w_q: the export's values
    live.engine_spec.refittable = False
    with pytest.raises(RefitError, match="was not built refittable; rebuild with linfusion-build --refittable"):
        refitting_runner(live, tmp_path, spec, {"w_q": new_q}, restore=set())
