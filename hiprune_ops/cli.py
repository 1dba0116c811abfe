"""`hiprune` command line. `hiprune demo` runs HiPrune on a CLIP ViT-L/14-336-shaped encoder (LLaVA-1.5's tower).

The encoder has random weights unless --model points at local weights (a CLIPVisionModel directory); nothing is
downloaded. The image is scikit-image's bundled astronaut photo unless --image is given.
--prompt adds HiPrune++'s prompt-matched tokens (encode's prompt_embedding), compared in CLIP's joint space: the
patch features through the tower's post-layernorm and a visual projection, the prompt through a CLIP text tower.
Both come from --model when it is a full CLIP checkpoint with its tokenizer; otherwise (offline, no weights) they
are random-weight layers of CLIP-L/14-336's text shape, fed the prompt's UTF-8 bytes as token ids, so the matches
show the pipeline, not the prompt's meaning.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Optional

import torch

from . import _timing as timing
from ._report import device_description, format_table, synchronize

# CLIP ViT-L/14 at 336 px, the tower of LLaVA-1.5.
VIT_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# Same 24x24 grid and pipeline, 4 narrow layers: for quick checks and the tests.
TINY_336 = dict(VIT_L14_336, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                projection_dim=64)
SIZES = {"vit-l-336": VIT_L14_336, "tiny": TINY_336}
# CLIP-L/14-336's text tower, and a narrow one for the tiny encoder: the demo's random prompt encoders.
TEXT_SIZES = {"vit-l-336": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
              "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA-1.5-7B's language model (Vicuna-7B, LLaMA architecture).
LLAMA_7B = dict(layers=32, hidden=4096, intermediate=11008)
ROLE_COLOURS = {0: (230, 40, 40), 1: (255, 190, 0), 2: (40, 120, 255), 3: (40, 210, 90)}
ROLE_NAMES = {0: "anchor", 1: "buffer", 2: "register", 3: "prompt"}
COLOUR_NAMES = {0: "red: anchors", 1: "yellow: buffers", 2: "blue: registers", 3: "green: prompt matches"}
# The timed passes, in the order each round runs them, with their progress-bar labels.
PLAIN, OURS = "unpatched SDPA encoder pass", "encoder + q/k scores + selection"
PASS_LABELS = {PLAIN: "unpatched SDPA pass   ", OURS: "encoder + q/k scores  "}
DEMO_WARMUP = 1  # one untimed pass of each: the first call's set-up lands on neither side
# A round of the full-size encoder (one pass of each) took 10.4 s of CPU time on the project's 2-core box, about 5 s
# of wall time when it is idle: 3 rounds keep a warm `make demo` near 30 s there, and still give a range.
DEMO_ROUNDS = 3


def prefill_flops(tokens: int, layers: int, hidden: int, intermediate: int) -> float:
    """Forward FLOPs of a LLaMA decoder prefill over `tokens` tokens (2 FLOPs per multiply-add; q/k/v/o
    projections 8*L*d^2, attention scores and weighted sum 4*L^2*d, SwiGLU MLP 6*L*d*f per layer; the LM head is
    left out because generate computes logits for the last token only)."""
    n, d, f = tokens, hidden, intermediate
    return layers * (8 * n * d * d + 4 * n * n * d + 6 * n * d * f)


def _step(index: int, total: int, text: str) -> float:
    print(f"[{index}/{total}] {text}", flush=True)
    return time.perf_counter()


class _LayerProgress:
    """Prints a progress bar over the encoder layers while a long forward runs (forward hooks, removed after)."""

    def __init__(self, layers, label: str, enabled: bool):
        self.layers, self.label, self.enabled = layers, label, enabled
        self.handles, self.done = [], 0

    def __enter__(self):
        if self.enabled:
            self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        return self

    def _hook(self, *_):
        self.done += 1
        total = len(self.layers)
        bar = "#" * (20 * self.done // total)
        line = f"      {self.label}: [{bar:<20}] layer {self.done}/{total}"
        if sys.stdout.isatty():
            sys.stdout.write("\r" + line + ("\n" if self.done == total else ""))
        elif self.done % max(1, total // 4) == 0 or self.done == total:  # logs: a few lines, no carriage returns
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def _load_image(path: Optional[str]):
    from PIL import Image

    if path is None:
        from skimage import data

        return Image.fromarray(data.astronaut()), "scikit-image astronaut"
    return Image.open(path).convert("RGB"), path


def _preprocess(image, size: int) -> torch.Tensor:
    """CLIP preprocessing: resize the short side to `size`, centre crop, normalise."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((pixels - mean) / std).unsqueeze(0), image


def _overlay(image, indices, roles, grid: int, path: str) -> None:
    from PIL import Image, ImageDraw

    base = image.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 150))  # dims the pruned tokens
    draw = ImageDraw.Draw(layer)
    cell_w, cell_h = base.size[0] / grid, base.size[1] / grid
    for index, role in zip(indices.tolist(), roles.tolist()):
        r, c = divmod(index, grid)
        box = (round(c * cell_w), round(r * cell_h), round((c + 1) * cell_w) - 1, round((r + 1) * cell_h) - 1)
        draw.rectangle(box, fill=ROLE_COLOURS[role] + (90,), outline=ROLE_COLOURS[role] + (255,))
    out = Image.alpha_composite(base, layer).convert("RGB")
    legend = ImageDraw.Draw(out)
    for i, role in enumerate(sorted(set(roles.tolist()) | {0, 1, 2})):
        y = 6 + 16 * i
        legend.rectangle((6, y, 18, y + 12), fill=ROLE_COLOURS[role])
        legend.text((24, y), ROLE_NAMES[role], fill=(255, 255, 255))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    out.save(path, format="PNG")


def _build_encoder(model_path: Optional[str], device: str, size: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if model_path:
        model = CLIPVisionModel.from_pretrained(model_path, local_files_only=True, attn_implementation="sdpa")
        source = model_path
    else:
        torch.manual_seed(0)
        config = CLIPVisionConfig(**SIZES[size], attn_implementation="sdpa")
        model = CLIPVisionModel(config)
        source = f"random weights ({size} shape)"
    return model.to(device=device, dtype=torch.float32).eval(), source


def _prompt_encoder(text: str, model_path: Optional[str], encoder, size: str, device: str):
    """(prompt embedding (D,), the map of patch features into its space, where both come from) for --prompt."""
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    post_layernorm = getattr(encoder, "vision_model", encoder).post_layernorm  # the layer's place varies by version
    if model_path:
        try:
            clip = CLIPModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
            tokens = CLIPTokenizer.from_pretrained(model_path, local_files_only=True)(text, return_tensors="pt")
        except (OSError, ValueError) as error:  # a vision-only checkpoint, or no tokenizer files
            print(f"      --model has no CLIP text tower and tokenizer ({type(error).__name__}): random prompt "
                  "encoder", flush=True)
        else:
            with torch.no_grad():
                embedding = clip.get_text_features(**tokens.to(device))
            embedding = getattr(embedding, "pooler_output", embedding)[0]
            return (embedding, lambda f: clip.visual_projection(post_layernorm(f)),
                    f"{model_path}'s CLIP text tower and tokenizer")
    torch.manual_seed(1)
    width = encoder.config.projection_dim
    config = CLIPTextConfig(**TEXT_SIZES.get(size, TEXT_SIZES["vit-l-336"]), projection_dim=width)
    tower = CLIPTextModelWithProjection(config).to(device).eval()
    projection = torch.nn.Linear(encoder.config.hidden_size, width, bias=False).to(device)
    ids = torch.tensor([list(text.encode("utf-8"))], device=device)
    with torch.no_grad():
        embedding = tower(input_ids=ids).text_embeds[0]
    return (embedding, lambda f: projection(post_layernorm(f)),
            "a random-weight CLIP text tower fed the prompt's UTF-8 bytes (the matches show the pipeline, not the "
            "prompt's meaning)")


def demo(args) -> int:
    from .integrations import HiPruneVisionTower

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    total = 5
    times = {}

    t0 = _step(1, total, "loading the image")
    image, image_name = _load_image(args.image)
    times["load + preprocess image"] = time.perf_counter() - t0

    t0 = _step(2, total, f"building the CLIP encoder ({args.model or args.size}, SDPA attention)")
    encoder, source = _build_encoder(args.model, device, args.size)
    config = encoder.config
    pixel_values, shown = _preprocess(image, config.image_size)
    pixel_values = pixel_values.to(device)
    grid = config.image_size // config.patch_size
    n_tokens = grid * grid
    times["build encoder"] = time.perf_counter() - t0
    print(f"      {source}; {config.num_hidden_layers} layers, {n_tokens} patch tokens + CLS, "
          f"attention: {config._attn_implementation}", flush=True)

    pruned = HiPruneVisionTower(encoder, args.budget, alpha=args.alpha, deep_layer=args.deep_layer,
                                object_layer=args.object_layer, official=args.official)
    layers = pruned.layers
    selection, kept = [], {}

    def ours_pass():
        obj, deep = pruned.scores(pixel_values)
        synchronize(device)
        middle = time.perf_counter()
        indices, roles = pruned.select(obj, deep)
        synchronize(device)
        selection.append(time.perf_counter() - middle)
        kept["indices"], kept["roles"] = indices, roles

    def plain_pass():
        encoder(pixel_values=pixel_values)

    @contextlib.contextmanager
    def around(name, round_):
        # Untimed: the layer progress bar (warm-up passes only) and, for the unpatched pass, the capture taken off.
        with _LayerProgress(layers, PASS_LABELS[name], round_ is None):
            if name != PLAIN:
                yield
                return
            with pruned.capture_paused():  # the unpatched pass runs without any capture
                yield

    def report_round(round_, so_far):
        plain, ours = so_far[PLAIN][round_], so_far[OURS][round_]
        print(f"      round {round_ + 1}/{args.rounds}: unpatched {plain * 1e3:.1f} ms, encoder + selection "
              f"{ours * 1e3:.1f} ms ({ours / plain:.3f}x)", flush=True)

    try:
        _step(3, total, f"timing: unpatched SDPA pass vs encoder + HiPrune selection ({DEMO_WARMUP} warm-up pass "
                        f"of each, then {args.rounds} interleaved round{'s' if args.rounds > 1 else ''})")
        with torch.inference_mode():
            samples = timing.interleaved_times({PLAIN: plain_pass, OURS: ours_pass}, rounds=args.rounds,
                                               warmup=DEMO_WARMUP, timer=timing.wall_timer(device), around=around,
                                               on_round=report_round)
        result = (kept["indices"][0].cpu(), kept["roles"][0].cpu())
    finally:
        pruned.remove()
    if args.prompt is not None:
        result = _prompt_tokens(args, encoder, pixel_values, result)
    passes = {name: timing.Spread.of(samples[name]) for name in (PLAIN, OURS)}
    passes["  of which selection"] = timing.Spread.of(selection[-args.rounds:])  # the warm-up's left out
    ratio = timing.ratios(samples, PLAIN)[OURS]

    t0 = _step(4, total, "writing the overlay")
    _overlay(shown, result[0], result[1], grid, args.output)
    times["overlay PNG"] = time.perf_counter() - t0

    _step(5, total, "report")
    counts = {name: int((result[1] == role).sum()) for role, name in ROLE_NAMES.items()
              if role < 3 or args.prompt is not None}
    print()
    print(format_table(f"Tokens kept (budget {pruned.budget} of {n_tokens}, alpha {pruned.alpha}, object layer "
                 f"{pruned.object_layer}, deep layer {pruned.deep_layer}, official={pruned.official}), "
                 f"image: {image_name}",
                 ["role", "tokens"], [[k, v] for k, v in counts.items()] + [["total", sum(counts.values())]]))
    print()

    once = [[stage, f"{seconds * 1e3:.2f}", "once"] for stage, seconds in times.items()]
    timed = [[stage, f"{spread.median * 1e3:.2f}", f"{spread.low * 1e3:.2f} to {spread.high * 1e3:.2f}"]
             for stage, spread in passes.items()]
    rows = once[:-1] + timed + once[-1:]  # in the order the stages ran: the overlay is written last
    print(format_table(f"Stage times on {device_description(device)}; encoder passes: median and range of "
                       f"{args.rounds} interleaved round{'s' if args.rounds > 1 else ''} after {DEMO_WARMUP} warm-up "
                       "pass of each", ["stage", "ms", "range ms"], rows))
    print(f"encoder + selection / unpatched SDPA pass: {ratio.ratio_text()}")
    if ratio.note() is not None:
        print(f"note: {ratio.note()}")
    last = max(pruned.object_layer, pruned.deep_layer)
    if last < config.num_hidden_layers:  # then part of the ratio is layers not run, not faster layers
        print(f"      (the patched pass stops at layer {last} of {config.num_hidden_layers}, the deepest it scores; "
              "the unpatched pass runs them all)")
    print()
    text = args.text_tokens
    full = prefill_flops(n_tokens + text, **LLAMA_7B)
    rows = []
    for budget in (192, 128, 64):
        flops = prefill_flops(budget + text, **LLAMA_7B)
        rows.append([budget, f"{flops / 1e12:.2f}", f"{(full - flops) / 1e12:.2f}", f"{100 * (1 - flops / full):.1f}%"])
    print(format_table(f"LLaVA-1.5-7B language-model prefill FLOPs ({n_tokens} visual tokens unpruned: "
                 f"{full / 1e12:.2f} TFLOPs; {text} text tokens)",
                 ["visual tokens", "TFLOPs", "saved TFLOPs", "saved"], rows))
    print()
    drawn = ", ".join(COLOUR_NAMES[role] for role in sorted(set(result[1].tolist()) | {0, 1, 2}))
    print(f"overlay written to {os.path.abspath(args.output)} ({drawn})")
    return 0


def _prompt_tokens(args, encoder, pixel_values, hiprune):
    """HiPrune++ on the demo's image: encode with the prompt embedding; its HiPrune part is the timed selection."""
    from .integrations import encode

    embedding, projection, source = _prompt_encoder(args.prompt, args.model, encoder, args.size, args.device)
    with torch.inference_mode():
        out = encode(encoder, pixel_values, args.budget, alpha=args.alpha, object_layer=args.object_layer,
                     deep_layer=args.deep_layer, official=args.official, prompt_embedding=embedding,
                     prompt_beta=args.prompt_beta, prompt_projection=projection)
    indices, roles = out.indices[0].cpu(), out.roles[0].cpu()
    if not torch.equal(indices[roles != 3], hiprune[0]):
        raise RuntimeError("hiprune demo: encode's HiPrune selection differs from the timed one")
    print(f"      --prompt {args.prompt!r}: {int((roles == 3).sum())} prompt-matched tokens (prompt_beta "
          f"{args.prompt_beta}) on top of the budget; prompt embedding from {source}", flush=True)
    return indices, roles


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hiprune", description="HiPrune visual-token pruning")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="prune a CLIP ViT-L/14-336 encoder's tokens and draw the kept ones")
    run.add_argument("--budget", type=int, default=192, help="tokens kept out of 576 (default 192)")
    run.add_argument("--alpha", type=float, default=0.1, help="share of the budget for anchors and buffers")
    run.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    run.add_argument("--official", action="store_true", help="reproduce the authors' released selection exactly")
    run.add_argument("--model", default=None, help="local CLIPVisionModel directory (default: random weights)")
    run.add_argument("--image", default=None, help="image file (default: scikit-image's astronaut)")
    run.add_argument("--output", default="hiprune_demo.png", help="overlay PNG path (default ./hiprune_demo.png)")
    run.add_argument("--object-layer", type=int, default=None,
                     help="1-based object layer (default 9 of 24, scaled to the depth)")
    run.add_argument("--deep-layer", type=int, default=-2,
                     help="deep layer, 1-based or negative from the end (default -2: the 23rd of 24, the layer "
                          "feeding LLaVA-1.5's projector)")
    run.add_argument("--size", choices=sorted(SIZES), default="vit-l-336",
                     help="random encoder shape (default vit-l-336; tiny: 4 narrow layers, same 24x24 grid)")
    run.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=DEMO_ROUNDS,
                     help=f"timed rounds (unpatched, then patched) after one warm-up pass of each; the ratio is the "
                          f"median over the rounds, shown with its range (default {DEMO_ROUNDS})")
    run.add_argument("--text-tokens", type=int, default=64, help="text tokens assumed in the FLOPs table")
    run.add_argument("--prompt", default=None,
                     help="HiPrune++: also keep the tokens that match this prompt (drawn green); the prompt "
                          "embedding comes from --model's CLIP text tower and tokenizer when it is a full CLIP "
                          "checkpoint, else from a random-weight CLIP text tower of the same shape fed the "
                          "prompt's UTF-8 bytes, offline (the matches then show the pipeline, not the meaning)")
    run.add_argument("--prompt-beta", type=float, default=0.1,
                     help="HiPrune++'s share: round(beta * budget) prompt tokens on top of the budget (default 0.1)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.budget == 0:  # the library reads 0 as "keep every token"; the demo is there to show a pruning
        print("error: --budget must be >= 1 (budget 0 keeps every token: nothing to draw)", file=sys.stderr)
        return 2
    try:
        return demo(args)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
