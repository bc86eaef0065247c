"""A student pruned from its teacher's layers is the model those layers make, and it generates (KV cache indices)."""

import pytest
import torch
from conftest import load_model, save_tiny_llama
from transformers import AutoModelForCausalLM

from hf_kd.models.pruning import decoder_layers, drop_one_divergence, evenly_spaced, most_important, prune_layers


def test_evenly_spaced_keeps_both_ends():
    assert evenly_spaced(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3] and evenly_spaced(5, 1) == [4]
    with pytest.raises(ValueError, match="depth must be in"):
        evenly_spaced(4, 5)


def test_pruned_model_equals_a_model_built_from_the_kept_layers(tmp_path):
    teacher = load_model(save_tiny_llama(tmp_path / "t", vocab_size=40, seed=0, layers=5))
    keep = [0, 2, 4]
    teacher.requires_grad_(False).eval()  # as a DistillationTrainer leaves its teacher
    pruned = prune_layers(teacher, keep)
    assert all(p.requires_grad for p in pruned.parameters()) and pruned.training
    pruned.eval()
    assert len(decoder_layers(teacher)) == 5 and len(decoder_layers(pruned)) == 3  # the teacher is left whole
    # the independent path: a fresh 3-layer model from the config, loaded with the kept layers' weights renamed
    config = teacher.config.to_dict()
    config["num_hidden_layers"] = 3
    built = AutoModelForCausalLM.from_config(type(teacher.config).from_dict(config))
    state = {}
    for name, value in teacher.state_dict().items():
        if ".layers." in name:
            index = int(name.split(".layers.")[1].split(".")[0])
            if index not in keep:
                continue
            name = name.replace(f".layers.{index}.", f".layers.{keep.index(index)}.")
        state[name] = value
    built.load_state_dict(state)
    ids = torch.randint(2, 40, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, built(ids).logits)
        assert not torch.allclose(pruned(ids).logits, teacher(ids).logits)
    # generate with the KV cache == the greedy argmax loop without it (a stale layer index breaks the cache)
    out = pruned.generate(
        ids[:1],
        attention_mask=torch.ones(1, 9, dtype=torch.long),
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=0,
    )
    loop = ids[:1]
    with torch.no_grad():
        for _ in range(5):
            loop = torch.cat([loop, pruned(loop, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert out.tolist() == loop.tolist()
    with pytest.raises(ValueError, match="increasing distinct layer indices"):
        prune_layers(teacher, [2, 1])


def test_drop_one_divergence_is_the_kl_to_each_copy_without_one_layer(tmp_path):
    model = load_model(save_tiny_llama(tmp_path / "m", vocab_size=40, seed=1, layers=4))
    ids = torch.randint(2, 40, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    before = {name: value.clone() for name, value in model.state_dict().items()}
    scores = drop_one_divergence(model, ids, mask)
    with torch.no_grad():  # the independent path: a pruned copy per layer, KL over the attended positions by hand
        full = model(ids, attention_mask=mask).logits.double().log_softmax(-1)
        for layer, score in enumerate(scores):
            copy = prune_layers(model, [i for i in range(4) if i != layer]).eval()
            other = copy(ids, attention_mask=mask).logits.double().log_softmax(-1)
            kl = (full.exp() * (full - other)).sum(-1)[mask.bool()].mean()
            assert score == pytest.approx(kl.item(), rel=1e-6)
    assert len(set(scores)) == 4 and len(decoder_layers(model)) == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # restored as it was
    assert most_important(scores, 2) == sorted(sorted(range(4), key=lambda i: scores[i])[2:])


def test_drop_one_divergence_restores_the_mode_when_a_forward_fails(tmp_path):
    model = load_model(save_tiny_llama(tmp_path / "m", vocab_size=40, seed=1, layers=2)).train()
    with pytest.raises(IndexError):
        drop_one_divergence(model, torch.tensor([[1, 99]]))  # an id past the vocabulary: the first forward fails
    assert model.training and len(decoder_layers(model)) == 2
