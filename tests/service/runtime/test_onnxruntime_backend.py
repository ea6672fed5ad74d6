"""The ONNX Runtime backend's session options come from the settings."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from service.config import Settings
from service.model_info import ModelInfo
from service.startup import backend_factory, resolve_engine
from service.runtime.onnxruntime_backend import OnnxRuntimeBackend

SPINNING_KEY = "session.intra_op.allow_spinning"


@pytest.mark.parametrize("spinning", [True, False])
def test_settings_decide_whether_idle_threads_spin(make_settings: Callable[..., Settings], spinning: bool) -> None:
    settings = make_settings(intra_op_spinning=spinning, intra_op_threads=2)
    model = ModelInfo.from_onnx(settings.model)
    backend = backend_factory(settings, resolve_engine(settings, model))()
    assert isinstance(backend, OnnxRuntimeBackend)
    try:
        options = backend._session.get_session_options()  # type: ignore[union-attr]
        if spinning:  # unset: ONNX Runtime's default, which spins
            with pytest.raises(RuntimeError, match="does not have configuration"):
                options.get_session_config_entry(SPINNING_KEY)
        else:
            assert options.get_session_config_entry(SPINNING_KEY) == "0"
        assert options.intra_op_num_threads == 2
        probabilities = backend.infer(np.zeros((2, 3, 224, 224), np.float32))
        assert probabilities.shape[0] == 2
    finally:
        backend.close()


def test_spinning_setting_reads_the_environment(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANEMIA_INTRA_OP_SPINNING", "false")
    assert make_settings().intra_op_spinning is False
