"""LeNet5 step times in PyTorch (CPU): dense, and DLRT's three-pass scheme.

Run by `benchmarks.lenet_torch` inside a virtual environment of its own
(torch is not a dependency of lrtrain); prints one JSON line per method.

The DLRT scheme is the one of the paper's algorithm and of its authors'
PyTorch code: per step a K pass (forward + backward with W = K V^T), an L
pass (W = U L^T), the augmented bases U^ = qr[K | U], V^ = qr[L | V], an S
pass in the augmented bases (S^ = U^^T U S V^T V^), then an SVD of the 2r x
2r core and truncation by tau. Conv kernels are treated as matrices
(c_out, c_in kh kw) and materialized for the convolution; linear layers
apply the factors. Ranks are held at 10 / 25 / 250 (conv1, conv2, fc1)
after truncation, the settled regime lrtrain's benchmark times too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

BATCH = 128
RANKS = {"conv1": 10, "conv2": 25, "fc1": 250}
SHAPES = {"conv1": (20, 1, 5, 5), "conv2": (50, 20, 5, 5), "fc1": (500, 800)}


def dense_params(gen):
  p = {}
  for name, shape in SHAPES.items():
    fan_in = 1
    for d in shape[1:]:
      fan_in *= d
    p[name] = (torch.randn(shape, generator=gen) / fan_in ** 0.5).requires_grad_()
    p[name + "_b"] = torch.zeros(shape[0], requires_grad=True)
  p["head"] = (torch.randn(10, 500, generator=gen) / 500 ** 0.5).requires_grad_()
  p["head_b"] = torch.zeros(10, requires_grad=True)
  return p


def forward(weights, biases, x, head):
  """weights: name -> callable(x) applying the layer without bias."""
  x = F.max_pool2d(F.relu(weights["conv1"](x) + biases["conv1"][None, :, None, None]), 2)
  x = F.max_pool2d(F.relu(weights["conv2"](x) + biases["conv2"][None, :, None, None]), 2)
  x = x.flatten(1)
  x = F.relu(weights["fc1"](x) + biases["fc1"])
  return x @ head[0].T + head[1]


def conv(W):
  return lambda x: F.conv2d(x, W)


def linear(W):
  return lambda x: x @ W.T


def dense_step(p, opt, x, y):
  ws = {"conv1": conv(p["conv1"]), "conv2": conv(p["conv2"]), "fc1": linear(p["fc1"])}
  bs = {k: p[k + "_b"] for k in SHAPES}
  loss = F.cross_entropy(forward(ws, bs, x, (p["head"], p["head_b"])), y)
  opt.zero_grad()
  loss.backward()
  opt.step()


class Factor:
  """W (c_out, rest) = U S V^T of a layer, rank r, with the DLRT sub-steps."""

  def __init__(self, name, gen):
    shape = SHAPES[name]
    self.name, self.shape = name, shape
    n = shape[0]
    m = 1
    for d in shape[1:]:
      m *= d
    r = RANKS[name]
    self.U = torch.linalg.qr(torch.randn(n, r, generator=gen))[0]
    self.V = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
    self.S = torch.diag(torch.rand(r, generator=gen) + 0.5)
    self.r = r

  def apply(self, U, S, V):
    if self.name == "fc1":
      return lambda x: ((x @ V) @ S.T) @ U.T
    W = (U @ S @ V.T).reshape(self.shape)
    return conv(W)


def dlrt_step(facs, others, x, y, lr=0.05, tau=0.1):
  bs = {k: others[k + "_b"] for k in SHAPES}
  head = (others["head"], others["head_b"])

  def loss_of(ws):
    return F.cross_entropy(forward(ws, bs, x, head), y)

  # K pass.
  Ks = {k: (f.U @ f.S).requires_grad_() for k, f in facs.items()}
  loss = loss_of({k: f.apply(Ks[k], torch.eye(f.r), f.V) for k, f in facs.items()})
  gK = torch.autograd.grad(loss, list(Ks.values()))
  # L pass.
  Ls = {k: (f.V @ f.S.T).requires_grad_() for k, f in facs.items()}
  loss = loss_of({k: f.apply(f.U, torch.eye(f.r), Ls[k]) for k, f in facs.items()})
  gL = torch.autograd.grad(loss, list(Ls.values()))
  aug = {}
  with torch.no_grad():
    for (k, f), g1, g2 in zip(facs.items(), gK, gL):
      K1 = Ks[k] - lr * g1
      L1 = Ls[k] - lr * g2
      Uh = torch.linalg.qr(torch.cat([K1, f.U], 1))[0]
      Vh = torch.linalg.qr(torch.cat([L1, f.V], 1))[0]
      Sh = (Uh.T @ f.U) @ f.S @ (f.V.T @ Vh)
      aug[k] = (Uh, Sh.requires_grad_(), Vh)
  # S pass (with the non-factor parameters).
  loss = loss_of({k: facs[k].apply(*aug[k]) for k in facs})
  plain = list(others.values())
  grads = torch.autograd.grad(loss, [a[1] for a in aug.values()] + plain)
  with torch.no_grad():
    for (k, f), gS in zip(facs.items(), grads):
      Uh, Sh, Vh = aug[k]
      S1 = Sh - lr * gS
      P, s, Qt = torch.linalg.svd(S1)
      tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s ** 2, [0]), 0), [0]))
      r_rule = int(torch.sum(tail > tau * torch.linalg.norm(s)))
      del r_rule  # the rank is held (module docstring); the rule still runs
      r = f.r
      f.U, f.S, f.V = Uh @ P[:, :r], torch.diag(s[:r]), Vh @ Qt[:r].T
    for p, g in zip(plain, grads[len(facs):]):
      p -= lr * g


def time_it(fn, steps, repeats):
  for _ in range(3):
    fn()
  meds = []
  for _ in range(repeats):
    ts = []
    for _ in range(steps):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
    meds.append(statistics.median(ts) * 1e3)
  return statistics.median(meds), min(meds), max(meds)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--threads", type=int, default=0)
  args = ap.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(BATCH, 1, 28, 28, generator=gen)
  y = torch.randint(0, 10, (BATCH,), generator=gen)
  p = dense_params(gen)
  opt = torch.optim.SGD(p.values(), lr=0.05, momentum=0.9)
  ms = time_it(lambda: dense_step(p, opt, x, y), args.steps, args.repeats)
  print(json.dumps(dict(method="torch_dense", ms=ms[0], ms_min=ms[1], ms_max=ms[2],
                        threads=torch.get_num_threads(), torch=torch.__version__)))
  facs = {k: Factor(k, gen) for k in SHAPES}
  others = {k: v.detach().requires_grad_() for k, v in dense_params(gen).items()
            if k not in SHAPES}
  ms = time_it(lambda: dlrt_step(facs, others, x, y), args.steps, args.repeats)
  print(json.dumps(dict(method="torch_dlrt_adaptive", ms=ms[0], ms_min=ms[1],
                        ms_max=ms[2], threads=torch.get_num_threads(),
                        torch=torch.__version__)))


if __name__ == "__main__":
  main()
