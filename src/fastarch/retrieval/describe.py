"""Automatically written descriptions of architectures, from their operator graph only (never
their name), and their MiniLM sentence embeddings for text queries."""
from __future__ import annotations

import numpy as np

from fastarch.retrieval.graph import OpGraph, human

__all__ = ["describe", "embed_texts"]


def _size_word(params: int) -> str:
    if params < 5e6:
        return "tiny"
    if params < 30e6:
        return "small"
    if params < 150e6:
        return "medium-sized"
    if params < 1e9:
        return "large"
    return "very large"


def describe(g: OpGraph) -> str:
    """One paragraph: size, input, kind of network and the operators that characterise it.

    Example:
        >>> describe(graph_of_resnet18)
        'A small convolutional neural network (CNN) for images with 11.7M parameters ...'
    """
    ops = g.op_counts
    labels = g.labels
    n_conv = sum(v for k, v in ops.items() if k.startswith("conv") and k != "conv_transpose")
    n_dw = sum(1 for label in labels if ".dw" in label)
    n_attn = ops.get("attention", 0) + min(ops.get("softmax", 0), ops.get("matmul", 0) // 2)
    n_linear = ops.get("linear", 0)
    n_rnn = ops.get("rnn", 0)
    n_res = ops.get("add", 0)
    kinds = []
    if n_attn and n_conv > 4 * max(n_attn, 1):
        kinds.append("hybrid convolution and attention network")
    elif n_attn and n_conv > 2:
        kinds.append("hybrid transformer with convolutions")
    elif n_attn:
        kinds.append("transformer")
    elif n_conv:
        kinds.append("convolutional neural network (CNN)")
    elif n_rnn:
        kinds.append("recurrent neural network (RNN)")
    elif ops.get("matmul", 0) > n_linear:
        kinds.append("state-space or recurrent sequence model")
    elif n_linear:
        kinds.append("MLP network")
    else:
        kinds.append("neural network")
    inputs = {"image": "images (vision)", "video": "video clips", "text": "text tokens (language)",
              "audio": "audio (speech)", "sequence": "sequences"}.get(g.input_kind, "tensors")
    text = (f"A {_size_word(g.params)} {kinds[0]} for {inputs} with {human(g.params)} parameters, "
            f"{human(g.flops)} FLOPs per example, {g.depth} layers deep and {g.width} wide.")
    feats = []
    if n_attn:
        feats.append(f"{n_attn} self-attention layers")
        if ops.get("roll", 0):
            feats.append("shifted windowed attention (window partition with roll)")
    if ops.get("moe", 0) or ops.get("topk", 0) and g.input_kind == "text":
        feats.append("mixture-of-experts routing with top-k")
    if n_conv:
        sizes = sorted({label.split(".")[1] for label in labels
                        if label.startswith("conv") and "." in label and label.split(".")[1][0] == "k"})
        feats.append(f"{n_conv} convolutions (kernel sizes {', '.join(s[1:] for s in sizes)})")
    if n_dw:
        feats.append(f"{n_dw} depthwise separable convolutions (mobile, efficient)")
    if n_res:
        feats.append(f"{n_res} residual connections")
    norms = [name.replace("_", " ") for name in ("batch_norm", "layer_norm", "group_norm")
             if ops.get(name)]
    if ops.get("math", 0) and ops.get("reduce", 0) and not norms:
        norms.append("RMS norm")
    if norms:
        feats.append("normalisation: " + ", ".join(norms))
    acts = [a.upper() if a in ("gelu", "relu") else a for a in
            ("relu", "gelu", "silu", "sigmoid", "hardswish", "tanh", "glu") if ops.get(a)]
    if acts:
        feats.append("activations: " + ", ".join(acts))
    if ops.get("mul", 0) and (ops.get("sigmoid", 0) or ops.get("silu", 0)) and n_conv:
        feats.append("squeeze-and-excitation or gating")
    if ops.get("concat", 0) > 4:
        feats.append(f"{ops['concat']} concatenations (dense or multi-branch connections)")
    if ops.get("resize", 0):
        feats.append("upsampling (dense prediction, detection or segmentation heads)")
    if ops.get("embedding", 0):
        feats.append("token embeddings")
    if n_rnn:
        feats.append("recurrent LSTM/GRU layers")
    if feats:
        text += " It uses " + "; ".join(feats) + "."
    return text


def embed_texts(texts: list[str]) -> np.ndarray:
    """(N, 384) float32 MiniLM sentence embeddings (L2-normalised), offline."""
    from fastarch.models.minilm import embed

    if not texts:
        return np.zeros((0, 384), np.float32)
    import torch

    threads = torch.get_num_threads()
    if len(texts) <= 4:
        # a query (a text, a ~75-token description) on one thread: two threads are faster
        # only on an idle CPU (2-core Zen 4: 20 ms vs 26 ms), while a CPU-bound job on the
        # other core makes every parallel region wait ~8 ms for a time slice (a 75-token
        # encode: 77-190 ms on 2 threads vs 31-38 ms on 1; 33 ms vs ~900 ms measured before)
        torch.set_num_threads(1)
    try:
        return embed(list(texts), batch_size=32).numpy().astype(np.float32)
    finally:
        torch.set_num_threads(threads)
