"""nn.MultiheadAttention with its projections as real submodules, so they can be converted.

``nn.MultiheadAttention.forward`` runs ``F.multi_head_attention_forward`` on its
own weight tensors and never calls a child module: swapping its children changes
nothing (biotorch's silent failure). :class:`ExplicitMultiheadAttention` computes
the same function with the projections as modules that hold the *original*
Parameter objects:

* ``in_proj``: an ``nn.Linear(E, 3E)`` around the packed ``in_proj_weight`` /
  ``in_proj_bias`` (or ``q_proj``/``k_proj``/``v_proj`` around the separate
  weights when ``kdim``/``vdim`` differ from ``embed_dim``);
* ``out_proj``: the original output projection module itself.

For self-attention (``query is key is value``, as in ``nn.TransformerEncoder`` and
torchvision's ViT) ``in_proj`` runs once. For cross-attention with packed weights
it runs on each distinct input and keeps the relevant third of the output: the
unused columns get an exactly zero output gradient, so every mode's weight
gradient is the right one, at the price of the wasted columns' compute.

Outputs equal the original module's (tested); ``to_original()`` gives back the
original ``nn.MultiheadAttention`` object with the same parameters. The class registers
itself as ``nn.MultiheadAttention``'s expander (:func:`bio_ext.registry.register_expander`).
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_expander

log = logging.getLogger(__name__)


#: this module's state_dict keys -> nn.MultiheadAttention's, with packed and with separate q/k/v weights
_PACKED_KEYS = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}
_SEPARATE_KEYS = {"q_proj.weight": "q_proj_weight", "k_proj.weight": "k_proj_weight",
                  "v_proj.weight": "v_proj_weight", "qkv_bias": "in_proj_bias"}


def _key_map(module) -> dict:
    return _PACKED_KEYS if module._qkv_same_embed_dim else _SEPARATE_KEYS


def _to_original_keys(module, state_dict, prefix, local_metadata):
    for ours, theirs in _key_map(module).items():
        if prefix + ours in state_dict:
            state_dict[prefix + theirs] = state_dict.pop(prefix + ours)
    return state_dict


def _from_original_keys(module, state_dict, prefix, *_):
    for ours, theirs in _key_map(module).items():
        if prefix + theirs in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + theirs)


def _float_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Boolean masks (True: not allowed) become additive float masks, as in torch."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


@register_expander(nn.MultiheadAttention)
class ExplicitMultiheadAttention(nn.Module):
    """Drop-in equivalent of an ``nn.MultiheadAttention`` whose projections are submodules."""

    bio_ext_expanded = True  # revert() calls to_original()

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.__dict__["_original"] = mha
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self.add_zero_attn = mha.add_zero_attn
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.training = mha.training
        if self._qkv_same_embed_dim:
            self.in_proj = self._linear(mha.in_proj_weight, mha.in_proj_bias, mha.training)
        else:  # separate weights; the packed bias stays one Parameter, added after the projections
            self.q_proj = self._linear(mha.q_proj_weight, None, mha.training)
            self.k_proj = self._linear(mha.k_proj_weight, None, mha.training)
            self.v_proj = self._linear(mha.v_proj_weight, None, mha.training)
            self.qkv_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        # state_dict keeps nn.MultiheadAttention's keys, so checkpoints of the original model load
        self._register_state_dict_hook(_to_original_keys)
        self._register_load_state_dict_pre_hook(_from_original_keys, with_module=True)

    @staticmethod
    def _linear(weight: nn.Parameter, bias: Optional[nn.Parameter], training: bool) -> nn.Linear:
        """An nn.Linear around existing Parameters (no new allocation)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.out_features, lin.in_features = weight.shape
        lin.weight, lin.bias = weight, bias
        lin.training = training
        return lin

    merge_masks = nn.MultiheadAttention.merge_masks  # used by nn.TransformerEncoderLayer's fast path

    # nn.TransformerEncoder(Layer)'s inference fast path reads these attributes
    @property
    def in_proj_weight(self) -> Optional[torch.Tensor]:
        return self.in_proj.weight if self._qkv_same_embed_dim else None

    @property
    def in_proj_bias(self) -> Optional[torch.Tensor]:
        return self.in_proj.bias if self._qkv_same_embed_dim else self.qkv_bias

    def _project(self, query, key, value):
        E = self.embed_dim
        if not self._qkv_same_embed_dim:
            b = self.in_proj_bias
            q = self.q_proj(query)
            if b is not None:  # the packed bias stays one Parameter, as in torch
                q = q + b[:E]
                return q, self.k_proj(key) + b[E:2 * E], self.v_proj(value) + b[2 * E:]
            return q, self.k_proj(key), self.v_proj(value)
        if query is key and key is value:
            return self.in_proj(query).unflatten(-1, (3, E)).unbind(-2)
        q = self.in_proj(query)[..., :E]
        if key is value:
            k, v = self.in_proj(key)[..., E:].unflatten(-1, (2, E)).unbind(-2)
        else:
            k, v = self.in_proj(key)[..., E:2 * E], self.in_proj(value)[..., 2 * E:]
        if not self.__dict__.get("_warned"):
            self.__dict__["_warned"] = True
            log.info("cross-attention with packed in_proj_weight: the projection runs once per distinct "
                     "input (exact gradients, extra compute)")
        return q, k, v

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = query.dim() == 3
        # work batch-first, (N, L, E), so that every projection sees the rows of one example together
        # (direct feedback broadcasts a per-example error over them); keep the identities of q/k/v
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = query.transpose(1, 0), key.transpose(1, 0)
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        bsz, tgt_len, E = query.shape
        H, hd = self.num_heads, self.head_dim
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (as in nn.MultiheadAttention): pass "
                             "attn_mask=nn.Transformer.generate_square_subsequent_mask(L)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False

        q, k, v = self._project(query, key, value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.transpose(0, 1).expand(bsz, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.transpose(0, 1).expand(bsz, 1, E)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))

        def heads(t):  # (N, L, E) -> (N * H, L, hd), torch's head order
            return t.reshape(bsz, t.shape[1], H, hd).transpose(1, 2).reshape(bsz * H, t.shape[1], hd)

        q, k, v = heads(q), heads(k), heads(v)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * H, 1, hd), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, H, -1, -1).reshape(bsz * H, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(hd))
            if attn_mask is not None:
                w = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                w = torch.bmm(q_scaled, k.transpose(-2, -1))
            w = F.softmax(w, dim=-1)
            if dropout_p > 0.0:
                w = F.dropout(w, p=dropout_p)
            out = torch.bmm(w, v).view(bsz, H, tgt_len, hd)
            weights = w.view(bsz, H, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, H, -1, src_len)
            out = F.scaled_dot_product_attention(q.view(bsz, H, tgt_len, hd), k.view(bsz, H, src_len, hd),
                                                 v.view(bsz, H, src_len, hd), attn_mask, dropout_p, is_causal)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, E))
        if not batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(1, 0)
        return out, weights

    def to_original(self) -> nn.MultiheadAttention:
        """The original module object, holding this module's current parameters."""
        mha = self.__dict__["_original"]
        p = mha._parameters
        if self._qkv_same_embed_dim:
            p["in_proj_weight"], p["in_proj_bias"] = self.in_proj.weight, self.in_proj.bias
        else:
            p["q_proj_weight"], p["k_proj_weight"] = self.q_proj.weight, self.k_proj.weight
            p["v_proj_weight"], p["in_proj_bias"] = self.v_proj.weight, self.qkv_bias
        p["bias_k"], p["bias_v"] = self.bias_k, self.bias_v
        mha.out_proj = self.out_proj
        mha.train(self.training)
        return mha

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
