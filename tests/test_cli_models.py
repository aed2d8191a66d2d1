"""Every backbone and every CPU-runnable throughput setting through `python -m src.run`, as the README shows them."""
import json

import pytest
import torch
import yaml

from tests.test_progress import TINY, cache_dir, run_cli  # noqa: F401 -- cache_dir is a fixture

SMALL = [a for a in TINY if not a.startswith("model.depth=")] + ["model.depth=2"]  # UViT needs a skip: depth >= 2


# The quick suite's time budget: `make test-slow` runs it. Quickly covered elsewhere: each backbone and each
# throughput path in-process (tests/test_models.py, tests/test_perf_options.py), a backbone of the user's own
# through the command (tests/test_formulations_plugins.py).
@pytest.mark.slow
def test_every_backbone_trains_with_the_throughput_settings(tmp_path, cache_dir):  # noqa: F811
    """The five backbones, with the settings a user may set on a CPU off their defaults; MM-DiT sized by depth."""
    common = [*SMALL, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "loss=rf_lognorm"]
    settings = ["model.fused_qkv=false", "model.attention_backend=math", "model.activation_checkpointing=true",
                "optim.fused=false", "model.compile=none"]
    code, console = run_cli(["-m", *common, "sweep_name=models", "model=mmdit,mmdit3,dit,crossdit,uvit", *settings],
                            tmp_path / "models.txt")
    assert code == 0, console[-3000:]
    code, console = run_cli([*common, "model.depth=3", "model.hidden_size=null", "model.num_heads=null",
                             "model.fused_modulation=true"], tmp_path / "sized.txt")
    assert code == 0, console[-3000:]

    runs = sorted((tmp_path / "outputs/multirun/models/digits/rf_lognorm_0.00_1.00").iterdir())
    assert [r.name for r in runs] == [f"model={m}" for m in ("crossdit", "dit", "mmdit", "mmdit3", "uvit")]
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
        assert cfg["attention_backend"] == "math" and cfg["activation_checkpointing"] is True, run.name
        assert len(json.loads((run / "results.json").read_text())) == 2, run.name  # one setting, EMA and raw
    sized = tmp_path / "outputs/runs/digits/rf_lognorm_0.00_1.00"
    cfg = yaml.safe_load((sized / "config.yaml").read_text())["model"]
    assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"]) == (3, None, None)  # sized by depth (paper): 64 d
    state = torch.load(sized / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    [embed] = [v for k, v in state.items() if k.endswith("x_embedder.proj.weight") and "ema" not in k]
    assert embed.shape[0] == 192
    assert len(json.loads((sized / "results.json").read_text())) == 2
