"""Our WorldTokenizer vs the official `rwkv` TRIE_TOKENIZER: encode / decode MB/s.

The corpus (~5 MB, seeded) is generated here: English prose, code (Python, C, JSON), Chinese,
Japanese, Korean, Russian, Arabic, Hindi and emoji (with ZWJ sequences and skin tones), as
paragraphs joined by blank lines. Before timing, both tokenizers must give the same ids for
the whole corpus and decode them back to it. Each number is the best of --repeats runs (ours
and the official one alternate, so background load hits both alike); MB = 10^6 bytes of
UTF-8 text. Construction time is measured cold (first tokenizer in this process).

    python benchmarks/bench_tokenizer.py [--mb 5] [--repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rwkv_ray.tokenizer import DEFAULT_VOCAB_PATH, WorldTokenizer  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tokenizer.json")

EN = (
    "the of and to in is was for that on as with by it from at his an are were which this be "
    "or has had not but first one their its new after who they have her she two been other "
    "when there all during into school time may years more most only over city some world "
    "would where later up such used many can state about national out known university "
    "united then made government system model language training data network learning tower "
    "Paris river music history people called second work team film several same between"
).split()
ZH = (
    "我们 中国 人工智能 机器学习 深度 网络 模型 数据 训练 语言 世界 城市 历史 北京 上海 "
    "发展 经济 社会 科学 技术 研究 大学 政府 国家 文化 音乐 电影 公司 市场 问题 时间 今天"
).split()
JA = (
    "東京 日本 世界 言語 モデル データ 学習 研究 大学 今日 天気 ですね です ます した "
    "こんにちは ありがとう それから タワー コンピュータ ネットワーク 歴史 文化 音楽 映画"
).split()
KO = "한국 서울 세계 언어 모델 데이터 학습 연구 대학교 오늘 날씨 입니다 있습니다 그리고".split()
RU = (
    "и в не на что с по как это он она мы они был была город мир история язык модель данные "
    "обучение сеть университет Москва Россия государство время люди работа музыка"
).split()
AR = "في من على إلى عن مع هذا هذه كان العالم مدينة اللغة التعلم البيانات جامعة الحكومة".split()
HI = "और के में है की को से यह एक भारत दुनिया भाषा मॉडल डेटा शिक्षा विश्वविद्यालय सरकार".split()
EMOJI = (
    "😀 😃 😄 😂 🤣 ❤️ 👍 👍🏽 👍🏿 🙏🏼 🎉 🔥 ✨ 🚀 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🧑🏾‍💻 🇫🇷 🇯🇵 1️⃣ ✅"
).split()
IDENTS = "x y i j n data model batch state tokens value result config loss grad step".split()
PY_LINES = [
    "def {a}({b}, {c}=None):",
    '    """Return the {a} of {b}."""',
    "    if {b} is None:",
    "        return {n}",
    "    for {c} in range(len({b})):",
    "        {a} += {b}[{c}] * {n}  # accumulate",
    "    {a} = {{'{b}': [{n}, {n}], '{c}': ({a}, {b})}}",
    "    return {a}",
    "",
]
C_LINES = [
    "static int {a}(const int *{b}, size_t {c}) {{",
    "\tfor (size_t i = 0; i < {c}; ++i) {{",
    '\t\tprintf("%d\\n", {b}[i] + {n});',
    "\t}}",
    "\treturn {n};",
    "}}",
    "",
]


def _words(rng: random.Random, words: list[str], n: int, sep: str, end: str) -> str:
    return sep.join(rng.choice(words) for _ in range(n)) + end


def _paragraph(rng: random.Random, kind: str) -> str:
    """One paragraph of the given kind (a few hundred bytes)."""
    if kind == "en":
        sents = []
        for _ in range(rng.randint(2, 6)):
            s = _words(rng, EN, rng.randint(5, 18), " ", rng.choice([".", ".", "?", "!", ";"]))
            if rng.random() < 0.3:
                s += f" In {rng.randint(1800, 2024)}, {rng.randint(2, 999)} of them."
            sents.append(s[0].upper() + s[1:])
        return " ".join(sents)
    if kind in ("py", "c"):
        lines = PY_LINES if kind == "py" else C_LINES
        out = []
        for line in lines * rng.randint(1, 3):
            fill = {k: rng.choice(IDENTS) for k in "abc"} | {"n": str(rng.randint(0, 4096))}
            out.append(line.format(**fill))
        return ("\r\n" if rng.random() < 0.1 else "\n").join(out)
    if kind == "json":
        obj = {rng.choice(IDENTS): [rng.random(), rng.choice(EN), None, True] for _ in range(6)}
        return json.dumps(obj, indent=rng.choice([None, 2, 4]), ensure_ascii=rng.random() < 0.3)
    if kind == "emoji":
        return _words(rng, EMOJI + EN[:20], rng.randint(10, 40), rng.choice([" ", ""]), "")
    words, sep = {"zh": (ZH, ""), "ja": (JA, ""), "ko": (KO, " "), "ru": (RU, " ")}.get(
        kind, (AR, " ") if kind == "ar" else (HI, " ")
    )
    end = {"zh": "。", "ja": "。", "hi": "।"}.get(kind, ".")
    return sep.join(_words(rng, words, rng.randint(5, 15), sep, end) for _ in range(4))


# Share of paragraphs per kind (English and code dominate typical fine-tuning data).
MIX = {"en": 40, "py": 10, "c": 4, "json": 5, "zh": 12, "ja": 6, "ko": 4, "ru": 8}
MIX |= {"ar": 4, "hi": 4, "emoji": 3}


def make_corpus(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    parts, size = [], 0
    while size < n_bytes:
        p = _paragraph(rng, rng.choices(kinds, weights)[0])
        parts.append(p)
        size += len(p.encode()) + 2
    return "\n\n".join(parts)


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function, alternating between them each round."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=5.0, help="corpus size in MB (10^6 bytes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    t0 = time.perf_counter()
    ours = WorldTokenizer()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    official = TRIE_TOKENIZER(str(DEFAULT_VOCAB_PATH))
    official_build_s = time.perf_counter() - t0

    text = make_corpus(int(args.mb * 1e6))
    n_bytes = len(text.encode())
    ids = ours.encode(text)
    if ids != official.encode(text):
        sys.exit("FAIL: our ids differ from the official tokenizer's")
    if ours.decode(ids) != text or official.decode(ids) != text:
        sys.exit("FAIL: decode(encode(corpus)) != corpus")

    enc = best_of(
        {"ours": lambda: ours.encode(text), "official": lambda: official.encode(text)}, args.repeats
    )
    dec = best_of(
        {"ours": lambda: ours.decode(ids), "official": lambda: official.decode(ids)}, args.repeats
    )
    mb_s = {
        f"{op}_{k}": n_bytes / 1e6 / t
        for op, d in (("enc", enc), ("dec", dec))
        for k, t in d.items()
    }

    print(
        f"corpus: {n_bytes / 1e6:.2f} MB, {len(ids):,} tokens ({n_bytes / len(ids):.2f} B/token),"
        " ids identical to the official tokenizer"
    )
    print(f"{'':10s}{'ours':>10s}{'official':>10s}{'speedup':>9s}")
    for op in ("enc", "dec"):
        o, r = mb_s[f"{op}_ours"], mb_s[f"{op}_official"]
        print(f"{op + 'ode MB/s':10s}{o:10.2f}{r:10.2f}{o / r:8.2f}x")
    print(f"{'build s':10s}{build_s:10.2f}{official_build_s:10.2f}")

    result = {
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "ours_mb_s": round(mb_s["enc_ours"], 3),
        "official_mb_s": round(mb_s["enc_official"], 3),
        "speedup": round(mb_s["enc_ours"] / mb_s["enc_official"], 3),
        "build_s": round(build_s, 3),
        "official_build_s": round(official_build_s, 3),
        "decode_ours_mb_s": round(mb_s["dec_ours"], 3),
        "decode_official_mb_s": round(mb_s["dec_official"], 3),
        "decode_speedup": round(mb_s["dec_ours"] / mb_s["dec_official"], 3),
        "corpus_bytes": n_bytes,
        "corpus_tokens": len(ids),
        "corpus_mix": MIX,
        "repeats": args.repeats,
        "identical_ids": True,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
