"""Exact round trips and error handling of ``g2quant.targets.pack``."""
import numpy as np
import pytest

from g2quant.targets import pack

WORDS = [np.uint8, np.uint16, np.uint32, np.uint64]
SHAPES = [(1, 1), (3, 7), (5, 63), (2, 129), (4, 64), (0, 5), (3, 0)]
PAIRS = {  # name -> (pack, unpack, lo, hi, bits)
    "1bit": (pack.pack_1bit, pack.unpack_1bit, -1, 1, 1),
    "2bit": (pack.pack_2bit, pack.unpack_2bit, -2, 1, 2),
    "ternary": (pack.pack_ternary, pack.unpack_ternary, -1, 1, 2),
    "4bit": (pack.pack_4bit, pack.unpack_4bit, -8, 7, 4),
    "8bit": (pack.pack_8bit, pack.unpack_8bit, -128, 127, 8),
}


def _random(name, shape, rng):
    _, _, lo, hi, _ = PAIRS[name]
    if name == "1bit":
        return np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("word", WORDS)
def test_round_trip_exact(name, shape, word):
    p, u, _, _, bits = PAIRS[name]
    q = _random(name, shape, np.random.default_rng(hash((name, shape)) % 2**32))
    packed = p(q, word=word)
    assert packed.dtype == np.dtype(word)
    assert packed.shape == pack.packed_shape(shape, bits, word)
    assert packed.shape[1] * np.dtype(word).itemsize * 8 >= shape[1] * bits
    back = u(packed, shape)
    assert back.dtype == np.int8 and back.shape == shape
    np.testing.assert_array_equal(back, q)


@pytest.mark.parametrize("name", list(PAIRS))
def test_extremes_round_trip(name):
    p, u, lo, hi, _ = PAIRS[name]
    vals = [lo, hi] if name == "1bit" else list(range(lo, hi + 1))
    q = np.array([vals * 3], dtype=np.int8)
    np.testing.assert_array_equal(u(p(q), q.shape), q)


def test_documented_bit_order():
    # 4-bit: value k at bits (k % 2) * 4 of byte k // 2, code q + 8
    q = np.array([[1, -2, 7]], dtype=np.int8)
    np.testing.assert_array_equal(pack.pack_4bit(q), [[(9) | (6 << 4), 15]])
    # 1-bit: LSB first, +1 -> 1; padding bits are zero
    q1 = np.array([[1, -1, 1, 1, -1, -1, -1, -1, 1]], dtype=np.int8)
    np.testing.assert_array_equal(pack.pack_1bit(q1), [[0b00001101, 0b1]])
    # words are the bytes read little-endian
    w32 = pack.pack_1bit(q1, word=np.uint32)
    assert w32.shape == (1, 1) and int(w32[0, 0]) == 0b1_00001101
    # 2-bit code q + 2
    np.testing.assert_array_equal(pack.pack_2bit(np.array([[-2, -1, 0, 1]], np.int8)), [[0 | 1 << 2 | 2 << 4 | 3 << 6]])


def test_ternary_matches_2bit():
    q = np.random.default_rng(0).integers(-1, 2, size=(4, 33)).astype(np.int8)
    np.testing.assert_array_equal(pack.pack_ternary(q), pack.pack_2bit(q))


@pytest.mark.parametrize("name,bad", [("1bit", 2), ("1bit", 0), ("2bit", 2), ("2bit", -3),
                                      ("ternary", -2), ("4bit", 8), ("4bit", -9)])
def test_out_of_range(name, bad):
    p = PAIRS[name][0]
    q = np.zeros((2, 5), np.int8) + (1 if name == "1bit" else 0)
    q[1, 3] = bad
    with pytest.raises(ValueError, match=str(bad)):
        p(q)


@pytest.mark.parametrize("name", list(PAIRS))
def test_wrong_dtype_and_ndim(name):
    p = PAIRS[name][0]
    with pytest.raises(ValueError, match="int8"):
        p(np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="int8"):
        p([[1, 1]])
    with pytest.raises(ValueError, match="2-D"):
        p(np.ones(5, np.int8))


@pytest.mark.parametrize("name", list(PAIRS))
def test_unpack_wrong_shape(name):
    p, u, _, _, _ = PAIRS[name]
    q = np.ones((3, 10), np.int8)
    packed = p(q)
    with pytest.raises(ValueError, match="does not match"):
        u(packed, (3, 100))
    with pytest.raises(ValueError, match="does not match"):
        u(packed, (4, 10))
    with pytest.raises(ValueError, match="uint"):
        u(packed.astype(np.int16), (3, 10))


def test_bad_word():
    q = np.ones((1, 4), np.int8)
    with pytest.raises(ValueError, match="word"):
        pack.pack_4bit(q, word=np.int32)
    with pytest.raises(ValueError, match="word"):
        pack.pack_4bit(q, word=12)


def test_dispatch():
    q = np.random.default_rng(1).integers(-7, 8, size=(3, 9)).astype(np.int8)
    np.testing.assert_array_equal(pack.unpack_bits(pack.pack_bits(q, 4), q.shape, 4), q)
    with pytest.raises(ValueError, match="storage width"):
        pack.pack_bits(q, 3)
