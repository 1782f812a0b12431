"""Cross-entropy reference: what a PyTorch user writes (fp32 softmax over materialized logits;
float64 stays float64, for the test oracle)."""
import torch
import torch.nn.functional as F


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """logits (..., V), targets (...) -> loss (scalar, or (...) with reduction="none")."""
    x = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(x if x.dtype == torch.float64 else x.float(), targets.reshape(-1).long(),
                           ignore_index=ignore_index, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def linear_cross_entropy(h, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
    """cross_entropy(h @ weight.T + bias, targets): the language-model head and its loss."""
    return cross_entropy(F.linear(h, weight, bias), targets, ignore_index, reduction)
