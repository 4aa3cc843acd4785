"""The site curriculum: spike-driven input sites (or the Q/K/V neurons) that pass their real input through until a
training step."""

import pytest
import torch
from conftest import TINY, fails, fit, logged, tiny

from spiking_lm.model import GPT, INPUT_SITES
from spiking_lm.train.curriculum import CurriculumConfig

ALL_INPUTS = dict(spiking_qkv_in=True, spiking_proj_in=True, spiking_fc_in=True)
FC_IN_FROM_STEP_3 = ["--model.gpt.spiking_fc_in", "true", "--model.curriculum.sites_from_step", "3"]
QKV_FROM_STEP_3 = ["--model.gpt.spiking_qkv", "true", "--model.curriculum.sites", "[qkv]"] + FC_IN_FROM_STEP_3[2:]


@pytest.mark.parametrize(
    "switches, kinds, own",
    [(ALL_INPUTS, INPUT_SITES, "_in_neuron."), (dict(spiking_qkv=True), ("qkv",), "qkv_neuron.")],
    ids=["input sites", "qkv"],
)
def test_passthrough_sites_give_the_spiking_default(switches, kinds, own):
    torch.manual_seed(0)
    default = GPT(tiny())
    switched = GPT(tiny(**switches))
    missing, unexpected = switched.load_state_dict(default.state_dict(), strict=False)
    assert not unexpected and missing and all(own in k for k in missing)  # only the sites' own
    idx = torch.randint(16, (2, 8))  # (B, L)
    assert [s.name.rsplit(".", 1)[1] for s in switched.sites_of(kinds)] == list(kinds) * 2
    assert not torch.allclose(switched(idx)[0], default(idx)[0])  # the sites change the model...
    for site in switched.sites_of(kinds):
        site.passthrough = True
    torch.testing.assert_close(switched(idx)[0], default(idx)[0], rtol=0, atol=0)  # ...until they pass x through


@pytest.mark.parametrize("site, args", [("fc_in", FC_IN_FROM_STEP_3), ("qkv", QKV_FROM_STEP_3)])
def test_sites_fire_from_the_configured_step(tmp_path, site, args):
    root = fit(tmp_path, *args)
    trained = logged(root, f"train_firing_rate/layer0.{site}")
    assert sorted(trained) == [3, 4, 5]  # steps 0-2 ran without the site, so it counted nothing
    assert logged(root, f"val_firing_rate/layer0.{site}")  # validation at step 3 ran with it, as every later one
    assert len(logged(root, "train_firing_rate/layer0.mlp")) == 6  # the other neurons fired throughout


def test_a_resumed_run_switches_at_the_same_step(tmp_path):
    full = fit(tmp_path, *FC_IN_FROM_STEP_3, name="full")
    first = fit(tmp_path, *FC_IN_FROM_STEP_3, steps=2, name="first")
    resumed = fit(tmp_path, *FC_IN_FROM_STEP_3, "--ckpt_path", str(first / "checkpoints" / "last.ckpt"), name="resumed")
    assert sorted(logged(resumed, "train_firing_rate/layer0.fc_in")) == [3, 4, 5]
    want, got = logged(full, "train_loss"), logged(resumed, "train_loss")
    assert sorted(got) == [2, 3, 4, 5]  # one step before the switch, three after
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], abs=1e-6), step


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.curriculum.sites_from_step", "-1"], "sites_from_step must be an integer >= 0"),
        (["--model.curriculum.sites_from_step", "3"], "no site of the kinds in curriculum.sites (qkv_in, proj_in"),
        (["--model.curriculum.sites", "[mlp]"], "curriculum.sites must name sites from qkv_in, qkv, proj_in, fc_in"),
        (["--model.curriculum.sites", "[]"], "curriculum.sites must name sites from"),
    ],
)
def test_bad_curriculum_is_refused(capsys, tmp_path, args, message):
    argv = ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path)]
    status, err = fails(capsys, [*argv, *args])
    assert status != 0 and message in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_config_rejects_a_bool():
    with pytest.raises(ValueError, match="sites_from_step"):
        CurriculumConfig(sites_from_step=True)
