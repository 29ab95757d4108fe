"""The plain fast path of the YAML loader (core/yamlload.py) gives what PyYAML's path gives.

Whenever `_plain_document` answers, its Document (data, positions of values and keys,
implicit scalars, no problem) must equal the general path's; on anything else it must
step aside (None). Checked on every example file, on the synthetic benchmark files, and
on generated near-misses of the plain shape.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core import yamlload

ROOT = Path(__file__).resolve().parents[2]


def agree(text: str) -> bool:
    """True when the fast path answered (and then it agrees with PyYAML's)."""
    fast = yamlload._plain_document("p.yaml", text)
    if fast is None:
        return False
    slow = yamlload._load_yaml("p.yaml", text)
    assert slow == fast, text
    return True


def test_every_example_file() -> None:
    answered = 0
    files = [*(ROOT / "tests" / "data").rglob("*.y*ml"), *(ROOT / "pipelines").glob("*.yaml")]
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            continue
        answered += agree(text)
    assert answered >= 7  # the example graph at least takes the fast path


def test_the_benchmark_shape() -> None:
    text = ("# yaml-language-server: $schema=../schemas/pipeline.schema.json\n"
            "dag_id: pipeline_00123\ndescription: Synthetic pipeline pipeline_00123 for the "
            "benchmark.\nowner: team-bench\ndepends_on: [pipeline_00001, pipeline_00007]\n")
    assert agree(text)
    assert agree("dag_id: a   # trailing comment\nenabled: True\nbackfill: false\n"
                 "depends_on: [ x , y.z-1 ]\ntrigger_rule: all_done\n\n  # indented comment\n")
    assert agree("dag_id: a\ndepends_on: []\ndescription: it's a, b; c & d * e!\n")


KEYS = ["dag_id", "owner", "description", "depends_on", "enabled", "conf", "on", "yes",
        "key-x", "<<", "_k", "1", "a b", "true"]
SEPARATORS = [": ", ":", ":  ", " : ", ":\t"]
VALUES = ["x", "team-bench", "a b  c", "true", "True", "FALSE", "yes", "off", "1", "-1",
          "1.5", "1e3", ".inf", "~", "null", "2025-01-01", "12:30", "[a, b]", "[ a ,b ]",
          "[]", "[ ]", "[a,]", "[1, a]", "[a, [b]]", "[a b]", "[on]", "[a] x", "'q'", '"q"',
          "a: b", "a #c", "a# c", "x  ", "{a: 1}", "|", ">", "&a x", "*a", "!t x", "-x", "- x",
          "a, b", "é", "a\u00a0b", "=", "?x", "%x", "@x", "`x", "a:b", "0x1f", "1_000", "",
          "  ", "# only", "a\\b", "[a # c, b]", "[a, b] # c"]
LINES = st.one_of(
    st.builds(lambda k, s, v: f"{k}{s}{v}", st.sampled_from(KEYS), st.sampled_from(SEPARATORS),
              st.sampled_from(VALUES)),
    st.sampled_from(["", "# comment", "  # indented", "   ", "  continued", "---", "...",
                     "- item", "%YAML 1.2", "dag_id: a\r", "\tx: y", "key: \x85"]),
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(LINES, min_size=1, max_size=6), st.booleans())
def test_generated_near_misses(lines: list[str], final_newline: bool) -> None:
    text = "\n".join(lines) + ("\n" if final_newline else "")
    if text.strip():
        agree(text)
