"""The kubelet's `$(NAME)` expansion of a container's command, args and env values, for tests
that check what a pod the operator builds will really run (tests/unit/test_builders.py).

    from harness.kubelet_vars import expand_vars
    expand_vars("--out=$(KUBETUNE_RUN)/x", {"KUBETUNE_RUN": "r1"})   # "--out=r1/x"
"""

from __future__ import annotations

from collections.abc import Mapping


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Expand `$(NAME)` from `env` like the kubelet: `$$` is a literal `$`, unknown names stay."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 == len(text):
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env.get(name, f"$({name})"))
            i = end + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)
