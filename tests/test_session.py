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
