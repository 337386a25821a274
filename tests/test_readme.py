"""The README's Python examples run, and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_and_print_what_they_claim():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python examples"
    code = "\n".join(blocks)
    claim_re = re.compile(r"^print\(.*\)[ \t]+#[ \t]*(.+)$", re.M)
    expected = [m.group(1).strip() for m in claim_re.finditer(code)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    printed = [line for line in lines if line.strip()]
    checked = [e for e in expected if not e.startswith("the ")]
    assert len(checked) >= 5
    for claim in checked:
        # a claim may be followed by an explanation in parentheses
        claim = re.sub(r"\s*\(.*\)$", "", claim)
        assert any(claim in line for line in printed), f"README claims {claim!r}; got {printed}"
