"""
MuonAdamW: nanochat's combined optimizer (reference commit 92d63d4), in MLX.
Usually the embeddings and scalars go into AdamW, and the matrix parameters go into Muon.

AdamW (decoupled weight decay, https://arxiv.org/abs/1711.05101), per parameter:
    p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = lerp(v, g^2, 1-b2)
    p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps)
math in fp32, moments stored in the parameter's dtype (bf16 for the embeddings in a bf16 run).

Muon (https://kellerjordan.github.io/posts/muon/), per group of same-shape matrices stacked (K, r, c):
    Nesterov momentum -> (bf16) -> MuonEq row equilibration -> Polar Express orthogonalization
    -> fp32 -> Muon+ renormalization -> NorMuon factored second moment -> cautious weight decay,
    with lr scaled by max(1, r/c)^0.5.
References: Polar Express arXiv:2505.16932, NorMuon arXiv:2510.05491, MuonEq arXiv:2603.28254,
Muon+ arXiv:2602.21545.

How a training loop uses it (the optimizer never calls mx.eval: that is the caller's job)

    optimizer = model.setup_optimizer(...)            # or setup_optimizer(model, ...)
    loss_and_grad = nn.value_and_grad(model, lambda x, y: model(x, y))
    for step in ...:
        loss, grads = loss_and_grad(x, y)
        for group in optimizer.param_groups:         # schedules, exactly like nanochat
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
        optimizer.step(model, grads)                  # grads: nested tree or flat {name: array}
        mx.eval(loss, model.parameters(), optimizer.state)

The update itself is one mx.compile'd pure function (params, grads, state, hyper) -> (params, state).
The scalar hyperparameters travel as one fp32 array `hyper` (a row per group), built from
param_groups by `optimizer.hyperparameters()`, so changing lr/momentum/wd never recompiles.

Inside a larger compiled train step, pass `hyper` in explicitly (an mx.array created inside a
compiled function is a constant of the trace: the schedule would be frozen at its first value)
and list optimizer.state among the compiled state:

    state = [model.state, optimizer.state]
    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x, y, hyper):
        loss, grads = loss_and_grad(x, y)
        optimizer.step(model, grads, hyper=hyper)     # or: optimizer.apply(flat_params, flat_grads, hyper)
        return loss
    loss = train_step(x, y, optimizer.hyperparameters())

Data parallel: gradients must be averaged across processes before the update, either by the
caller or through `optimizer.step(model, grads, grad_reduce=fn)`, where fn maps the flat
{name: grad} dict to the averaged one (e.g. all_sum / world size per tensor). nanochat's
ZeRO-2 sharding of the optimizer state (spec 2.4) is not done here: every process holds the
full state and computes the identical update.

Differences from nanochat, none of which changes the math: state is created at construction
(nanochat lazily at the first step, from zeros as well); every parameter is expected to have a
gradient (nanochat skips params whose grad is None); the per-parameter AdamW step counts live
in the state as fp32 scalars (nanochat keeps python ints and hands them over as fp32 tensors).
"""
import logging

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from mlxchat.common import get_compute_dtype

logger = logging.getLogger(__name__)

# Polar Express coefficients for num_iters=5, safety factor 2e-2, cushion 2 (arXiv:2505.16932)
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

# columns of the `hyper` array (one row per param group)
ADAMW_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")
MUON_HYPER = ("lr", "momentum", "beta2", "weight_decay")
HYPER_WIDTH = max(len(ADAMW_HYPER), len(MUON_HYPER))


# -----------------------------------------------------------------------------
# the two update rules, as pure functions of arrays

def lerp(a, b, w):
    """torch.lerp: a + w*(b-a) for |w| < 0.5, else b - (b-a)*(1-w) (the exact end is reached at w=1).
    w is a 0-d array, so both forms are built and one is picked without a Python branch."""
    d = b - a
    return mx.where(mx.abs(w) < 0.5, a + w * d, b - d * (1 - w))


def frobenius_norm(x):
    # over the last two dims, accumulated in fp32 whatever x's dtype (torch's norm does the same).
    # Rows first, then the row sums: one reduction over all r*c elements of each of a few large
    # matrices keeps a handful of GPU blocks busy (on the H100 these were the optimizer's slowest
    # kernels); the same sum in another fp32 order
    x = x.astype(mx.float32)
    return mx.sqrt(mx.sum(mx.sum(x * x, axis=-1, keepdims=True), axis=-2, keepdims=True))


def adamw_update(p, g, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """One AdamW step for one parameter (step already incremented). Returns (p, exp_avg, exp_avg_sq)
    in their storage dtypes. All hyperparameters are 0-d fp32 arrays."""
    # bf16 params (embeddings) do the math in fp32: 1 - beta2 alone loses everything in bf16
    p32, g32 = p.astype(mx.float32), g.astype(mx.float32)
    m32, v32 = exp_avg.astype(mx.float32), exp_avg_sq.astype(mx.float32)
    p32 = p32 * (1 - lr * wd)  # decoupled weight decay, before the update
    m32 = lerp(m32, g32, 1 - beta1)
    v32 = lerp(v32, mx.square(g32), 1 - beta2)
    if exp_avg.dtype == mx.float32 and exp_avg_sq.dtype == mx.float32:
        # Each moment in a kernel of its own (mx.contiguous ends a fusion), so each new array takes its
        # old one's buffer: MLX gives an output its input's buffer only in a kernel of one output, and
        # as one kernel the three new arrays were allocated beside the three old ones (d12 on the CPU:
        # 2.4 GB). The update reads them back as stored: the same fp32 numbers. Moments stored in bf16
        # stay in the one kernel: the update takes them unrounded.
        m32, v32 = mx.contiguous(m32), mx.contiguous(v32)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = mx.sqrt(v32 / bias2) + eps
    p32 = p32 - (lr / bias1) * (m32 / denom)
    return p32.astype(p.dtype), m32.astype(exp_avg.dtype), v32.astype(exp_avg_sq.dtype)


def polar_express(X, ns_steps):
    """Approximate the orthogonal polar factor of each (r, c) matrix of X. Matmuls run in X's dtype
    (bf16 in a bf16 run); the elementwise combinations in fp32, rounded once to X's dtype (what
    torch.compile's fused kernels do). The Gram matrix is formed on the smaller side: X^T X for
    tall matrices, X X^T otherwise."""
    dtype = X.dtype
    X = (X.astype(mx.float32) / (frobenius_norm(X) * 1.01 + 1e-6)).astype(dtype)
    # the coefficients as slices of an array, not python floats: MLX inlines scalar constants
    # into its fused kernels, which would compile a separate kernel for each of the 5 steps
    coeffs = mx.array(POLAR_EXPRESS_COEFFS, dtype=mx.float32)
    tall = X.shape[-2] > X.shape[-1]
    for i in range(ns_steps):
        a, b, c = coeffs[i, 0], coeffs[i, 1], coeffs[i, 2]
        A = X.swapaxes(-1, -2) @ X if tall else X @ X.swapaxes(-1, -2)
        B = (b * A.astype(mx.float32) + c * (A @ A).astype(mx.float32)).astype(dtype)
        XB = X @ B if tall else B @ X
        X = (a * X.astype(mx.float32) + XB.astype(mx.float32)).astype(dtype)
    return X


def muon_update(P, G, momentum_buffer, second_momentum_buffer, lr, momentum, beta2, wd, ns_steps, ortho_dtype):
    """One Muon step for a stack of K same-shape matrices P, G: (K, r, c) fp32. lr is already scaled
    by max(1, r/c)^0.5. Returns (P, momentum_buffer, second_momentum_buffer)."""
    r, c = P.shape[-2:]
    red_dim = -1 if r >= c else -2  # the second moment is per row (tall/square) or per column (wide)
    # shape-dependent constants as array slices, for the same reason as the coefficients above:
    # python floats would compile one set of kernels per matrix shape
    sqrt_r, sqrt_min_rc, n = mx.array([r ** 0.5, min(r, c) ** 0.5, P.shape[red_dim]], dtype=mx.float32)

    # Nesterov momentum, in lerp form
    # (M in a kernel of its own, which then takes the old buffer's memory: see adamw_update)
    M = mx.contiguous(lerp(momentum_buffer, G, 1 - momentum))
    U = lerp(G, M, momentum)

    # orthogonalize in bf16 when the run computes in bf16 (fp16's exponent range is too small: stay fp32)
    X = U.astype(ortho_dtype)
    # MuonEq: give every row the RMS row norm so the spectrum entering the iteration is better conditioned
    # (the Frobenius norm from the row sums it needs anyway: one pass over X less)
    X32 = X.astype(mx.float32)
    row_sq = mx.sum(X32 * X32, axis=-1, keepdims=True)
    target = mx.sqrt(mx.sum(row_sq, axis=-2, keepdims=True)) / sqrt_r
    row_norm = mx.maximum(mx.sqrt(row_sq), 1e-6)
    X = X * (target / row_norm).astype(X.dtype)
    X = polar_express(X, ns_steps)
    U = X.astype(mx.float32)

    # Muon+: snap the Frobenius norm to sqrt(min(r, c)), that of an exactly semi-orthogonal matrix
    U = U * (sqrt_min_rc / mx.maximum(frobenius_norm(U), 1e-6))

    # NorMuon: factored second moment (mean square per row or column), then rescale each row or
    # column by its rsqrt, keeping the matrix's Frobenius norm
    v_mean = mx.sum(mx.square(U), axis=red_dim, keepdims=True) / n
    v_norm = mx.sqrt(mx.sum(v_mean, axis=(-2, -1), keepdims=True) * n)
    S = lerp(second_momentum_buffer, v_mean, 1 - beta2)
    step_size = mx.rsqrt(mx.maximum(S, 1e-10))
    v_norm_new = mx.sqrt(mx.sum((v_mean * n) * mx.square(step_size), axis=(-2, -1), keepdims=True))
    U = U * (step_size * (v_norm / mx.maximum(v_norm_new, 1e-10)))

    # cautious weight decay: only decay coordinates where the update and the weight agree in sign
    mask = (U * P) >= 0
    P = P - (lr * U + lr * wd * P * mask)
    return P, M, S


def make_update_fn(layout, ortho_dtype):
    """The whole optimizer step as one pure function
        (params, grads, state, hyper) -> (params, state)
    params/grads: flat {name: array}; state: see MuonAdamW.state; hyper: (num_groups, HYPER_WIDTH) fp32.
    `layout` (static): per group (kind, names, ns_steps, state key)."""
    def update(params, grads, state, hyper):
        new_params = dict(params)
        new_state = {"adamw": {}, "muon": {}}
        # every scalar of `hyper` as a 0-d view: split, not hyper[gi][i], which is one gather kernel per
        # scalar (and unstacking with P[i] one per matrix): ~130 launches a step at d12
        rows = [[c.reshape(()) for c in mx.split(r, HYPER_WIDTH, axis=1)] for r in mx.split(hyper, len(layout), axis=0)]
        for gi, (kind, names, ns_steps, key) in enumerate(layout):
            h = rows[gi]
            if kind == "adamw":
                lr, beta1, beta2, eps, wd = (h[i] for i in range(len(ADAMW_HYPER)))
                for name in names:
                    s = state["adamw"][name]
                    step = s["step"] + 1
                    p, m, v = adamw_update(params[name], grads[name], s["exp_avg"], s["exp_avg_sq"],
                                           step, lr, beta1, beta2, eps, wd)
                    new_params[name] = p
                    new_state["adamw"][name] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
            else:
                lr, momentum, beta2, wd = (h[i] for i in range(len(MUON_HYPER)))
                s = state["muon"][key]
                P = mx.stack([params[n] for n in names]).astype(mx.float32)
                G = mx.stack([grads[n] for n in names]).astype(mx.float32)
                P, M, S = muon_update(P, G, s["momentum_buffer"], s["second_momentum_buffer"],
                                      lr, momentum, beta2, wd, ns_steps, ortho_dtype)
                # one fused kernel for the whole stack's step, then views per matrix. (The step per
                # matrix on the unstacked parameters saves the 78 stack copies at d12, but its 78
                # small kernels cost more: +0.2 ms of GPU time per step on an H100.)
                for n, p in zip(names, mx.split(P, len(names), axis=0)):
                    new_params[n] = p.reshape(p.shape[1:]).astype(params[n].dtype)
                new_state["muon"][key] = {"momentum_buffer": M, "second_momentum_buffer": S}
        return new_params, new_state
    return update


# -----------------------------------------------------------------------------
# the optimizer object: param groups (python), state (arrays), a compiled update

def _shape_key(shape):
    return "x".join(str(d) for d in shape)


class MuonAdamW:
    """Combined optimizer: Muon for the transformer matrices, AdamW for everything else.

    param_groups: list of dicts, like nanochat's but naming parameters instead of holding them:
      - 'kind': 'adamw' or 'muon', 'names': parameter names (keys of model.named_parameters())
      - AdamW: 'lr', 'betas', 'eps', 'weight_decay'
      - Muon: 'lr', 'momentum', 'ns_steps', 'beta2', 'weight_decay' (all names of one group share a shape)
    params: flat {name: array}, used for the state's shapes and dtypes.
    """

    def __init__(self, param_groups, params):
        self.param_groups = [dict(g) for g in param_groups]
        # orthogonalization runs in bf16 only in a bf16 run (as nanochat: fp16 compute keeps fp32)
        self.ortho_dtype = mx.bfloat16 if get_compute_dtype() == mx.bfloat16 else mx.float32
        self.shapes = []  # per group: the matrix shape (muon) or None (adamw)
        adamw_state, muon_state = {}, {}
        for group in self.param_groups:
            names = list(group["names"])
            group["names"] = names
            if group["kind"] == "adamw":
                group["betas"] = tuple(group["betas"])
                for n in names:
                    p = params[n]
                    # moments in the param's dtype: bf16 embeddings get bf16 moments, as nanochat's zeros_like
                    adamw_state[n] = {"step": mx.array(0.0, dtype=mx.float32),
                                      "exp_avg": mx.zeros(p.shape, dtype=p.dtype),
                                      "exp_avg_sq": mx.zeros(p.shape, dtype=p.dtype)}
                self.shapes.append(None)
            elif group["kind"] == "muon":
                shape = tuple(params[names[0]].shape)
                assert len(shape) == 2 and all(tuple(params[n].shape) == shape for n in names), \
                    f"a Muon group holds matrices of one shape, got {[tuple(params[n].shape) for n in names]}"
                key = _shape_key(shape)
                assert key not in muon_state, f"two Muon groups with shape {shape}"
                K, (r, c) = len(names), shape
                dtype = params[names[0]].dtype
                # the second moment is factored: per row for tall/square matrices, per column for wide ones
                s_shape = (K, r, 1) if r >= c else (K, 1, c)
                muon_state[key] = {"momentum_buffer": mx.zeros((K, r, c), dtype=dtype),
                                   "second_momentum_buffer": mx.zeros(s_shape, dtype=dtype)}
                self.shapes.append(shape)
            else:
                raise ValueError(f"unknown optimizer kind: {group['kind']}")
        all_names = [n for g in self.param_groups for n in g["names"]]
        assert len(all_names) == len(set(all_names)), "a parameter is in two groups"
        # a dict that is updated in place (never rebound), so mx.compile(inputs=..., outputs=...) can hold it
        self.state = {"adamw": adamw_state, "muon": muon_state}
        self._layout = None
        self._update = None

    # -- hyperparameters

    def hyperparameters(self):
        """The groups' current scalar hyperparameters as one (num_groups, HYPER_WIDTH) fp32 array.
        Muon's lr already carries the max(1, r/c)^0.5 factor (computed in double, like nanochat)."""
        rows = []
        for group, shape in zip(self.param_groups, self.shapes):
            if group["kind"] == "adamw":
                beta1, beta2 = group["betas"]
                row = [group["lr"], beta1, beta2, group["eps"], group["weight_decay"]]
            else:
                r, c = shape
                beta2 = group["beta2"] if group["beta2"] is not None else 0.0
                row = [group["lr"] * max(1.0, r / c) ** 0.5, group["momentum"], beta2, group["weight_decay"]]
            rows.append(row + [0.0] * (HYPER_WIDTH - len(row)))
        return mx.array(rows, dtype=mx.float32)

    def _compiled_update(self):
        layout = tuple((g["kind"], tuple(g["names"]), g.get("ns_steps"), _shape_key(s) if s else None)
                       for g, s in zip(self.param_groups, self.shapes))
        if layout != self._layout:  # first call, or ns_steps changed: (re)build the compiled step
            self._layout = layout
            self._update = mx.compile(make_update_fn(layout, self.ortho_dtype))
        return self._update

    # -- the step

    def apply(self, params, grads, hyper):
        """Functional step: flat {name: array} params and grads -> new flat params. Advances
        self.state (in place). hyper = self.hyperparameters(), made outside any compiled function."""
        missing = [n for g in self.param_groups for n in g["names"] if n not in grads]
        if missing:
            raise KeyError(f"no gradient for {len(missing)} optimized parameters, e.g. {missing[:3]}")
        new_params, new_state = self._compiled_update()(params, grads, self.state, hyper)
        self.state.update(new_state)
        return new_params

    def step(self, model, grads, grad_reduce=None, hyper=None):
        """Update the model's parameters in place (model.update). grads: the tree from
        nn.value_and_grad or a flat {name: grad} dict. grad_reduce: optional fn(flat grads) ->
        flat grads, e.g. the average across data-parallel processes. hyper: see the module doc."""
        if not all(isinstance(v, mx.array) for v in grads.values()):
            grads = dict(tree_flatten(grads))
        if grad_reduce is not None:
            grads = grad_reduce(grads)
        if hyper is None:
            hyper = self.hyperparameters()
        new_params = self.apply(model.named_parameters(), grads, hyper)
        model.update(tree_map_with_path(lambda path, p: new_params.get(path, p), model.parameters()))

    # -- checkpointing

    def state_dict(self):
        """(tensors, meta): tensors = {str: mx.array} (mx.save_safetensors-able), meta = JSON-able
        {'param_groups': [...], 'steps': {name: int}}. Save both, e.g.
            mx.save_safetensors(path, tensors, metadata={"optimizer": json.dumps(meta)})."""
        tensors = {}
        for name, s in self.state["adamw"].items():
            tensors[f"adamw.{name}.exp_avg"] = s["exp_avg"]
            tensors[f"adamw.{name}.exp_avg_sq"] = s["exp_avg_sq"]
        for key, s in self.state["muon"].items():
            tensors[f"muon.{key}.momentum_buffer"] = s["momentum_buffer"]
            tensors[f"muon.{key}.second_momentum_buffer"] = s["second_momentum_buffer"]
        mx.eval(tensors)
        groups = []
        for g in self.param_groups:
            g = dict(g)
            g["names"] = list(g["names"])
            if "betas" in g:
                g["betas"] = list(g["betas"])
            groups.append(g)
        steps = {name: int(s["step"].item()) for name, s in self.state["adamw"].items()}
        return tensors, {"param_groups": groups, "steps": steps}

    def load_state_dict(self, tensors, meta):
        """Restore state and group hyperparameters (lr, initial_lr, momentum, weight_decay, ... like
        torch's Optimizer.load_state_dict). The groups must name the same parameters. Tensors are
        cast to this optimizer's state dtypes (a bf16 run's moments load into an fp32 run)."""
        saved = meta["param_groups"]
        assert len(saved) == len(self.param_groups), f"{len(saved)} saved groups, {len(self.param_groups)} here"
        for group, sg in zip(self.param_groups, saved):
            assert sg["kind"] == group["kind"] and list(sg["names"]) == group["names"], \
                f"param group mismatch: saved {sg['kind']} {sg['names'][:3]}..., here {group['kind']} {group['names'][:3]}..."
        new_adamw, new_muon = {}, {}
        for name, s in self.state["adamw"].items():
            new_adamw[name] = {"step": mx.array(float(meta["steps"][name]), dtype=mx.float32)}
            for k in ("exp_avg", "exp_avg_sq"):
                new_adamw[name][k] = self._checked(tensors, f"adamw.{name}.{k}", s[k])
        for key, s in self.state["muon"].items():
            new_muon[key] = {k: self._checked(tensors, f"muon.{key}.{k}", s[k])
                             for k in ("momentum_buffer", "second_momentum_buffer")}
        for group, sg in zip(self.param_groups, saved):
            for k, v in sg.items():
                if k not in ("kind", "names"):
                    group[k] = tuple(v) if k == "betas" else v
        self.state.update({"adamw": new_adamw, "muon": new_muon})

    @staticmethod
    def _checked(tensors, key, like):
        if key not in tensors:
            raise KeyError(f"optimizer state is missing {key}")
        t = tensors[key]
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"optimizer state {key}: saved shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        return mx.array(t).astype(like.dtype)


# -----------------------------------------------------------------------------
# nanochat's parameter groups (GPT.setup_optimizer)

def setup_optimizer(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
    """MuonAdamW over a GPT with nanochat's groups, in nanochat's order (the order fixes the state's
    layout): AdamW for lm_head, wte, value embeddings, resid lambdas, x0 lambdas, smear/backout
    scalars; then one Muon group per distinct matrix shape under transformer.h, shapes sorted."""
    params = model.named_parameters()
    model_dim = model.config.n_embd
    # AdamW lrs were tuned at width 768: scale them by 1/sqrt(width/768)
    dmodel_lr_scale = (model_dim / 768) ** -0.5
    logger.info(f"Scaling the LR for the AdamW parameters ∝1/√({model_dim}/768) = {dmodel_lr_scale:.6f}")

    # transformer.h matrices in module order (block 0: c_q, c_k, c_v, c_proj, [ve_gate], c_fc, c_proj; block 1...)
    matrix_names = [n for n in params if n.startswith("transformer.h.")]
    value_embed_names = sorted((n for n in params if n.startswith("value_embeds.")), key=lambda n: int(n.split(".")[1]))
    embedding_names = ["transformer.wte.weight"]
    lm_head_names = ["lm_head.weight"]
    smear_names = ["smear_gate.weight", "smear_lambda", "backout_lambda"]
    n_grouped = len(matrix_names) + len(value_embed_names) + len(embedding_names) + len(lm_head_names) + 2 + len(smear_names)
    assert n_grouped == len(params), f"{len(params)} parameters, {n_grouped} in optimizer groups"

    param_groups = [
        dict(kind="adamw", names=lm_head_names, lr=unembedding_lr * dmodel_lr_scale, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", names=embedding_names, lr=embedding_lr * dmodel_lr_scale, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
        dict(kind="adamw", names=value_embed_names, lr=embedding_lr * dmodel_lr_scale * 0.5, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", names=["resid_lambdas"], lr=scalar_lr * 0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
        dict(kind="adamw", names=["x0_lambdas"], lr=scalar_lr, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        # the smear gate/lambda and backout use a fixed lr of 0.2 (not scaled by width or batch)
        dict(kind="adamw", names=smear_names, lr=0.2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
    ]
    for shape in sorted({tuple(params[n].shape) for n in matrix_names}):
        names = [n for n in matrix_names if tuple(params[n].shape) == shape]
        param_groups.append(dict(kind="muon", names=names, lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))

    optimizer = MuonAdamW(param_groups, params)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer
