"""models/gathering: the fused loss run as the output head's own forward (how FSDP2 / ZeRO-3 gather its weight)."""

import torch
from conftest import load_model, save_tiny_llama


def test_as_head_forward_runs_fn_as_the_head_and_puts_back_a_forward_set_on_it(tmp_path):
    """The loss runs as the head's forward for one call; a forward the head object carried before (Accelerate's
    device hooks set one) is the head's forward again afterwards, and a head without one gets its class's back."""
    from hf_kd.models.gathering import as_head_forward

    model = load_model(save_tiny_llama(tmp_path / "m", vocab_size=40, seed=1, layers=1))
    head = model.get_output_embeddings()
    hidden = torch.randn(3, head.in_features)
    out = as_head_forward(model, hidden, lambda rows, spec: rows @ spec.weight.T * 2)
    torch.testing.assert_close(out, hidden @ head.weight.T * 2)
    assert "forward" not in head.__dict__  # the class's forward again
    own = lambda rows: rows.sum()  # noqa: E731
    head.forward = own
    as_head_forward(model, hidden, lambda rows, spec: rows)
    assert head.__dict__["forward"] is own
