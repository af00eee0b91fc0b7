import torch

from data import tokenizer as T
from data.packing import IGNORE, Sample, pack
from model import Decoder, DecoderConfig


def samples():
    return [Sample([10, 11, 12], {"p_ref": [0.1, 0.2, 0.3, 0.9]}, tags=[0, 1, 2, -1], index=0),
            Sample([20, 21], {"p_ref": [0.5, 0.6, 0.7]}, index=1),
            Sample([30, 31, 32, 33, 34], index=2)]


def test_layout_labels_positions_docs():
    b = pack(samples(), row_len=12, prefix=[T.IMAGE, T.IMAGE])
    # sample 0: 2 image + bos + 3 caption = 6 positions; sample 1: 2 + 1 + 2 = 5; row 0 holds 11 of 12
    assert b.input_ids.shape == (2, 12)
    assert b.input_ids[0, :6].tolist() == [T.IMAGE, T.IMAGE, T.BOS, 10, 11, 12]
    assert b.labels[0, :6].tolist() == [IGNORE, IGNORE, 10, 11, 12, T.EOS]
    assert b.position_ids[0, :11].tolist() == list(range(6)) + list(range(5))
    assert b.doc_ids[0].tolist() == [0] * 6 + [1] * 5 + [2]
    assert b.labels[0, 11] == IGNORE and b.input_ids[0, 11] == T.PAD
    assert b.inputs["p_ref"][0, 2:6].tolist() == torch.tensor([0.1, 0.2, 0.3, 0.9]).tolist()
    assert b.inputs["p_ref"][1].eq(0).all() and b.inputs["p_ref"][0, :2].eq(0).all()  # no input there: 0
    assert b.tags[0, 2:6].tolist() == [0, 1, 2, -1] and b.tags[0, 6:].eq(-1).all()
    assert b.indices == [0, 1, 2]


def test_truncation_keeps_eos_label():
    b = pack([Sample(list(range(10, 30)), {"p_ref": [0.5] * 20 + [0.25]})], row_len=8, prefix=[T.IMAGE])
    assert b.labels[0].tolist()[-1] == T.EOS and (b.labels[0] != IGNORE).sum() == 7
    assert b.inputs["p_ref"][0, 1:].tolist() == [0.5] * 6 + [0.25]  # the inputs are cut like the labels


def test_packed_equals_unpacked_forward():
    """No token attends across captions and positions restart: packed logits equal each caption alone."""
    torch.manual_seed(0)
    # float64: one packed row and each caption alone are matmuls of other shapes (float32 sums differ in the last bits)
    model = Decoder(DecoderConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=64)).double().eval()
    packed = pack(samples(), row_len=32)
    assert packed.input_ids.shape[0] == 1
    logits = model(packed.input_ids, position_ids=packed.position_ids, doc_ids=packed.doc_ids)
    at = 0
    for s in samples():
        alone = pack([s], row_len=len(s.caption_ids) + 1)
        ref = model(alone.input_ids)  # one document per row: plain causal attention
        n = len(s.caption_ids) + 1
        torch.testing.assert_close(logits[0, at:at + n], ref[0], atol=1e-10, rtol=1e-10)
        at += n


def test_cut_masked_sample_trains_eos_only_after_an_answer():
    """pack's rule for a cut masked sample (instruction data): its <|eos|> label trains only right after a kept
    trained label that is not itself an <|eos|>; an unmasked sample keeps its trained <|eos|> whatever the cut."""
    s = Sample([10, 11, 12, 13, 14, 15], loss_mask=[0, 1, 1, 0, 0, 1, 1])

    def trained(sample, row_len):
        return [t for t in pack([sample], row_len).labels[0].tolist() if t != IGNORE]
    assert trained(s, 4) == [11, 12, T.EOS]  # cut inside the answer: it ends there
    assert trained(s, 5) == [11, 12] and trained(s, 6) == [11, 12]  # cut inside the question: no eos
    assert trained(s, 2) == []  # cut before the answer: nothing at all
    assert trained(Sample([10, T.EOS, 12, 13], loss_mask=[1, 1, 0, 1, 1]), 3) == [10, T.EOS]  # no eos after eos
    assert trained(Sample([10, 11, 12, 13, 14, 15]), 5) == [10, 11, 12, 13, T.EOS]  # no mask: as before
