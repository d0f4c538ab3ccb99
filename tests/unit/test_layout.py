import pytest
import torch

from dfmvr.facemodel.layout import CoeffLayout


def test_default_layout_is_269_numbers_in_reference_order():
    lay = CoeffLayout()
    assert lay.size == 80 + 64 + 80 + 27 + 3 * 6 == 269
    assert (lay.id, lay.exp, lay.tex, lay.gamma) == (slice(0, 80), slice(80, 144), slice(144, 224), slice(224, 251))
    assert lay.pose == slice(251, 269)


def test_split_join_round_trip_and_view_order():
    lay = CoeffLayout()
    c = torch.arange(2 * lay.size, dtype=torch.float32).reshape(2, lay.size)
    parts = lay.split(c)
    assert parts.angles.shape == (2, 3, 3) and parts.trans.shape == (2, 3, 3)
    # view 1 (front): angles then translation, 6 numbers per view
    assert parts.angles[0, 1].tolist() == [257.0, 258.0, 259.0]
    assert parts.trans[0, 1].tolist() == [260.0, 261.0, 262.0]
    assert torch.equal(lay.join(parts), c)


def test_wrong_size_names_the_layout():
    with pytest.raises(ValueError) as e:
        CoeffLayout().split(torch.zeros(2, 257))
    assert "(B, 269)" in str(e.value) and "id 80" in str(e.value) and "(2, 257)" in str(e.value)
    lay = CoeffLayout()
    parts = lay.zeros(1)._replace(exp=torch.zeros(1, 63))
    with pytest.raises(ValueError, match="'exp'"):
        lay.join(parts)
