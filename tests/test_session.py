"""bio_ext.session: the session stack, the feedback bank's cache, the error tap."""

import pytest
import torch

from bio_ext.errors import FeedbackSignalError
from bio_ext.session import FeedbackBank, FeedbackSession, activate, current_session, reset


def test_activate_and_reset_nest_and_restore_the_previous_session():
    outer, inner = FeedbackSession(FeedbackBank(), 3), FeedbackSession(FeedbackBank(), 3)
    assert current_session() is None
    t1 = activate(outer)
    t2 = activate(inner)
    assert current_session() is inner
    reset(t2)
    assert current_session() is outer
    reset(t1)
    assert current_session() is None


def test_the_bank_recomputes_its_concatenation_after_an_in_place_update_and_not_otherwise():
    bank = FeedbackBank()
    a, b = torch.randn(3, 4), torch.randn(3, 2, 2)
    cat = bank.concat([a, b], 3)
    assert torch.equal(cat, torch.cat([a, b.reshape(3, -1)], 1))
    assert bank.concat([a, b], 3) is cat
    a.mul_(2)
    assert torch.equal(bank.concat([a, b], 3)[:, :4], a)


def test_one_product_serves_every_layer_and_each_takes_its_slice():
    session = FeedbackSession(FeedbackBank(), 3)
    fb = [torch.randn(3, 4), torch.randn(3, 5)]
    slots = [session.register(f) for f in fb]
    e = torch.randn(6, 3)
    session.receive_error(e)
    for slot, f in zip(slots, fb):
        torch.testing.assert_close(session.take(slot), e @ f)


def test_a_feedback_of_the_wrong_height_and_a_missing_error_are_typed_errors():
    session = FeedbackSession(FeedbackBank(), 3)
    with pytest.raises(FeedbackSignalError, match="output_dim"):
        session.register(torch.randn(4, 2))
    slot = session.register(torch.randn(3, 2))
    with pytest.raises(FeedbackSignalError, match="did not flow"):
        session.take(slot)


@pytest.mark.parametrize("edit", ["data_inplace", "data_assign", "copy_under_no_grad", "set_buffer"])
def test_the_bank_never_serves_a_stale_concatenation_whatever_way_a_feedback_is_edited(edit):
    """Issue 17: ``.data`` writes do not bump ``_version``, so a cache keyed on it served the old matrix."""
    bank = FeedbackBank()
    holder = torch.nn.Module()
    holder.register_buffer("a", torch.randn(3, 4))
    holder.register_buffer("b", torch.randn(3, 2, 2))
    bank.concat([holder.a, holder.b], 3)
    new = torch.randn(3, 2, 2)
    if edit == "data_inplace":
        holder.b.data.copy_(new)
    elif edit == "data_assign":
        holder.b.data = new.clone()
    elif edit == "copy_under_no_grad":
        with torch.no_grad():
            holder.b.copy_(new)
    else:
        holder.b = new.clone()
    cat = bank.concat([holder.a, holder.b], 3)
    assert torch.equal(cat[:, 4:], new.reshape(3, -1))
    assert torch.equal(cat[:, :4], holder.a)


def test_a_dfa_model_uses_a_feedback_edited_through_data_on_the_next_step():
    import bio_ext
    torch.manual_seed(0)
    model = bio_ext.convert(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6),
                                                torch.nn.Tanh(), torch.nn.Linear(6, 3)), "dfa", seed=0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    h = {}
    model[2].register_forward_pre_hook(lambda m, a: [a[0].register_hook(lambda g: h.__setitem__("g", g))] and None)
    for step in range(2):
        if step == 1:
            model[2].feedback.data.mul_(-3.0)  # the user's edit must reach the next backward
        out = model(x)
        out.retain_grad()
        torch.nn.functional.cross_entropy(out, y).backward()
        torch.testing.assert_close(h["g"], out.grad @ model[2].feedback)
