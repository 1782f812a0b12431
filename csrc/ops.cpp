// Schemas of the C++ ops of fastlm (torch.ops.fastlm.*), and the Python module stub.
//
// Every schema lives here; the CUDA implementations are registered from the .cu files with
// TORCH_LIBRARY_IMPL(fastlm, CUDA, m), and fake (meta) implementations and autograd from
// Python (fastlm/ops/).  The public ops users call (rms_norm, apply_rotary, attention, ...)
// are Python custom ops in the same namespace that pick a backend and call these kernels.
// Mutated arguments are declared with (a!) annotations.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastlm._C only has to load this library so the static registrations run; the
// module itself is empty (pattern of pytorch/extension-cpp, works with py_limited_api).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

static bool built_with_cuda() {
#ifdef FASTLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(fastlm, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);

  // ---- normalization (csrc/norm.cu) ----
  // x, residual: (rows, N) with unit stride in the last dim; the rows scale by weight_offset + weight
  // (Gemma's 1 + w).  Returns
  // (out, residual_out = x + residual or empty, mean (rows,) fp32 or empty for RMS, rstd (rows,) fp32).
  m.def(
      "norm_fwd_cuda(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool is_rms,"
      " float weight_offset=0.) -> (Tensor, Tensor, Tensor, Tensor)");
  // h: the normalized input (x, or x + residual).  dresidual_out: grad of residual_out, or None.
  // Returns (dh, dweight or empty, dbias or empty); dh is the gradient of both x and residual.
  m.def(
      "norm_bwd_cuda(Tensor dy, Tensor? dresidual_out, Tensor h, Tensor? weight, Tensor mean, Tensor rstd,"
      " bool is_rms, bool has_bias, float weight_offset=0.) -> (Tensor, Tensor, Tensor)");

  // [rotary schemas]
  // ---- rotary embeddings (csrc/rotary.cu) ----
  // q, k: (batch, seqlen, heads, head_dim) or packed (tokens, heads, head_dim), unit stride in
  // the head dim.  cos, sin: (max_positions, rotary_dim / 2), fp32 or q's dtype.  Writes the
  // rotated q, k into q_out, k_out (which may be q, k: in place; dims past rotary_dim are then
  // left alone, else copied).  pos_mode: 0 = arange per sequence + offset, 1 = + per-sequence
  // offsets positions (num_seqs,), 2 = explicit positions (batch, seqlen) / (tokens,) (int32 or
  // int64).  cu_seqlens: int32 (num_seqs + 1,) for packed sequences.  conj: rotate by -theta.
  m.def(
      "rotary_cuda(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, Tensor? cu_seqlens,"
      " Tensor(a!) q_out, Tensor(b!) k_out, int offset, int pos_mode, bool interleaved, bool conj) -> ()");

  // [kv cache schemas]
  // ---- KV cache (csrc/kv_cache.cu) ----
  // Caches: contiguous (batch, max_seqlen, n_kv_heads, head_dim), or paged (num_blocks, block_size,
  // n_kv_heads, head_dim) with block_table int32 (batch, max_blocks_per_seq); unit stride in head_dim.
  // Writes k, v (batch, seqlen_new, n_kv_heads, head_dim) at positions cache_seqlens[b] + s (int32);
  // positions past the capacity and block ids outside [0, num_blocks) are skipped.
  m.def(
      "kv_cache_append_cuda(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor cache_seqlens,"
      " Tensor? block_table) -> ()");
  // Split-KV decode attention of q (batch, seqlen_q, n_heads_q, head_dim) over the first
  // cache_seqlens[b] tokens (from cache_leftpad[b] on, int32 (batch,), when given); causal aligned to
  // the end of the cache, window >= -1, softcap >= 0, num_splits in [1, 128] (resolved by the
  // caller).  workspace: zero-filled int32 counters (at least batch x n_kv_heads x 16-row tiles),
  // left zeroed, with which a split decode merges its splits in the same launch.  Returns out like
  // q.  Forward only.
  m.def(
      "decode_attention_cuda(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table,"
      " Tensor? cache_leftpad, float softmax_scale, bool causal, int window, float softcap, int num_splits,"
      " Tensor? workspace=None) -> Tensor");
  // decode_attention_cuda after appending k, v (batch, seqlen_new, n_kv_heads, head_dim) at positions
  // cache_seqlens[b] + s (cache_seqlens itself unchanged), attending over cache_seqlens[b] + seqlen_new
  // tokens.  rotary_cos/sin (max_positions, rotary_dim / 2), fp32 or q's dtype: q and k are first rotated
  // at those positions (seqlen_new == seqlen_q; q itself unchanged).  q_norm_weight / k_norm_weight
  // (head_dim,), fp32 or q's dtype: every head of q and k is first RMS-normalized (qk_norm_eps) and scaled
  // by qk_norm_offset + weight (Qwen3's / Gemma 3's q/k norms).  workspace as for
  // decode_attention_cuda.  One launch when seqlen_new == seqlen_q <= 16 and the decode needs no
  // zeroed counters or has a workspace, else two (append, decode).  Forward only.
  m.def(
      "decode_attention_with_kv_cuda(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v,"
      " Tensor cache_seqlens, Tensor? block_table, Tensor? cache_leftpad, Tensor? rotary_cos, Tensor? rotary_sin, bool rotary_interleaved,"
      " float softmax_scale, bool causal, int window, float softcap, int num_splits, Tensor? q_norm_weight=None,"
      " Tensor? k_norm_weight=None, float qk_norm_eps=1e-06, float qk_norm_offset=0., Tensor? workspace=None)"
      " -> Tensor");

  // ---- attention forward for sm_90 (csrc/sm90/attention.cu, built into fastlm._C_sm90 for sm_90a) ----
  // q (batch, seqlen_q, heads_q, D), k, v (batch, seqlen_k, heads_kv, D), fp16/bf16, D 64 or 128, unit
  // stride in D and 16-byte aligned strides; causal aligned to the bottom right.  Returns (out like q,
  // lse (batch, heads_q, seqlen_q) fp32).  Forward only (experimental: see fastlm.ops.attention_sm90).
  // overlap: 1 (default), FlashAttention-3's overlap of the softmax with the P V of the previous tile;
  // 2, that and its ping-pong of the two consumer warpgroups; 0, each wgmma waited for in turn.
  m.def(
      "attention_fwd_sm90_cuda(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal, int overlap=1)"
      " -> (Tensor, Tensor)");
  // Its backward: dK, dV per 128-key block (returned), dQ added into dq_accum (fp32, q's shape, zeroed by
  // the caller) with atomics.  lse from the forward and delta = rowsum(dout * out), both fp32
  // (batch, heads_q, seqlen_q).
  m.def(
      "attention_bwd_sm90_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta,"
      " Tensor(a!) dq_accum, float softmax_scale, bool causal) -> (Tensor, Tensor)");
}
