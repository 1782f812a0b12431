"""Cross-entropy reference: what a PyTorch user writes (fp32 softmax over materialized logits;
float64 stays float64, for the test oracle)."""
import torch
import torch.nn.functional as F


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  softcap=0.0, return_z_loss=False):
    """logits (..., V), targets (...) -> loss (scalar, or (...) with reduction="none").
    softcap > 0 caps the logits at softcap * tanh(logits / softcap); z_loss adds z_loss * lse^2
    per non-ignored row; return_z_loss also returns that term's (detached) share."""
    x = logits.reshape(-1, logits.shape[-1])
    x = x if x.dtype == torch.float64 else x.float()
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    t = targets.reshape(-1).long()
    rows = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = t != ignore_index
    zrows = z_loss * torch.logsumexp(x, -1).square() * valid if z_loss else torch.zeros_like(rows)
    rows = rows + zrows
    if reduction == "none":
        loss, z = rows.view(targets.shape), zrows.view(targets.shape)
    elif reduction == "sum":
        loss, z = rows.sum(), zrows.sum()
    else:
        n = valid.sum()
        loss, z = rows.sum() / n, zrows.sum() / n
    return (loss, z.detach()) if return_z_loss else loss


def linear_cross_entropy(h, weight, targets, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=0.0, return_z_loss=False):
    """cross_entropy(h @ weight.T + bias, targets): the language-model head and its loss."""
    return cross_entropy(F.linear(h, weight, bias), targets, ignore_index, reduction, label_smoothing, z_loss,
                         softcap, return_z_loss)
