"""Rendering conversations through the chat template, and the per-token loss mask.

How a conversation becomes tokens (all templates, no special case per model):

1. Render the whole conversation T, and for every assistant message j the prefix P_j = messages[:j] with the
   generation prompt and the prefix E_j = messages[:j+1] without it. For a template that renders each message
   independently of the later ones, P_j and E_j are prefixes of T, and T[len(P_j):len(E_j)] is exactly what the model
   must produce for turn j (its content, the end-of-turn token, and whatever the template writes after it). A
   conversation for which these are not prefixes of T is malformed for this template ("prefixes differ").
   (`return_assistant_tokens_mask` is not used: it needs `{% generation %}` markers in the template and silently
   returns an all-zero mask without them; SmolLM2's template has none.)
2. Cut T at those boundaries into prompt pieces and assistant pieces and tokenize every piece separately
   (`add_special_tokens=False`; a piece is encoded after a "\\n" that is then removed, so SentencePiece adds no
   prefix space mid-text). The tokens at a boundary are then those inference sees: the prompt up to the generation
   prompt, then the answer. Whole-text tokenization can differ from this only where a BPE merge would cross the
   boundary (an answer that starts with whitespace).
3. An assistant piece is trained up to and including its last special token (the end-of-turn token: `<|im_end|>` for
   ChatML/SmolLM2, `<|eot_id|>` for Llama 3); what follows it (ChatML's "\\n") is left out of the loss because the
   model stops at the end-of-turn token and never generates it. A piece without a special token is trained whole.
4. The rendered text carries its own BOS when the template writes one (Llama 3's `{{ bos_token }}`), so pieces are
   tokenized without special tokens; a BOS is prepended only when the tokenizer adds one to plain text and the
   rendered text does not already start with it. There is never a double BOS. SmolLM2 adds no BOS; its `<|im_start|>`
   (which is its BOS id) opens every turn, and its template adds a default system prompt when there is none.

The mask is positional (True at index t when ids[t] is a trained target, predicted from position t-1), never derived
from token ids: SmolLM2's pad token is its end-of-turn token.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxft.data.formats import Conversation
from jaxft.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized record.

    ids: int32 [L] token ids. mask: bool [L], True where ids[t] is a trained target (predicted from t-1); mask[0] is
      always False.
    keep_from: index of the first token of the final completion; left truncation may cut at most keep_from - 1 tokens
      (0 for text: a document is never cut).
    prompt_end: for a conversation that ends with an assistant turn, the number of tokens before that turn's answer
      (the prompt, generation prompt included); -1 otherwise. reference: that final assistant content, or None.
    source, number: the source index and the record's line/record number there.
    """

    ids: np.ndarray
    mask: np.ndarray
    keep_from: int
    prompt_end: int
    reference: str | None
    source: int
    number: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def trained(self) -> int:
        return int(self.mask.sum())


def truncate(ex: Example, seq_len: int, policy: str) -> Example | None:
    """`ex` if it fits in seq_len tokens; else None (`drop`), or its last seq_len tokens (`left`) while at least one
    token before the final completion remains, else None. A cut example's first token is no target."""
    cut = len(ex) - seq_len
    if cut <= 0:
        return ex
    if policy == "drop" or cut >= ex.keep_from:
        return None
    mask = ex.mask[cut:].copy()
    mask[0] = False
    return dataclasses.replace(
        ex,
        ids=ex.ids[cut:],
        mask=mask,
        keep_from=ex.keep_from - cut,
        prompt_end=ex.prompt_end - cut if ex.prompt_end >= 0 else -1,
    )


class Renderer:
    """Tokenizes conversations with loss masks and plain texts, for one tokenizer and chat template."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None) or None
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        added = tokenizer("a", add_special_tokens=True)["input_ids"]
        # "Adds a BOS" = the tokenizer's own post-processor puts bos_token_id in front of plain text.
        self.adds_bos = self.bos_id is not None and added[:1] == [self.bos_id] and plain[:1] != [self.bos_id]
        self.special_ids = set(tokenizer.all_special_ids)
        self.special_ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        self._newline = tokenizer("\n", add_special_tokens=False)["input_ids"]

    def require_template(self, where: str) -> None:
        if self.template is None:
            raise ConfigError(
                f"{where}: the tokenizer has no chat template and data.chat_template is not set; set data.chat_template "
                "to a Jinja template or use format: text"
            )

    # -- tokenization ------------------------------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def _encode_pieces(self, pieces: list[str], at_start: list[bool]) -> list[list[int]]:
        """Tokenize pieces in one batch; a piece not at the start of a text is encoded after "\\n", then stripped."""
        n = len(self._newline)
        out = self._encode([p if s else "\n" + p for p, s in zip(pieces, at_start)])
        redo = []
        for k, s in enumerate(at_start):
            if not s:
                if out[k][:n] == self._newline:
                    out[k] = out[k][n:]
                else:  # the newline merged with the piece's first characters
                    redo.append(k)
        for k, ids in zip(redo, self._encode([pieces[k] for k in redo])):
            out[k] = ids
        return out

    def _render(self, convs: list[list[dict]], generation: bool) -> list[str | Exception]:
        if not convs:
            return []
        kw = dict(tokenize=False, add_generation_prompt=generation, chat_template=self.template)
        try:
            return list(self.tokenizer.apply_chat_template(convs, **kw))
        except Exception:  # one bad conversation (a template's raise_exception) fails the batch: go one by one
            out: list[str | Exception] = []
            for c in convs:
                try:
                    out.append(self.tokenizer.apply_chat_template(c, **kw))
                except Exception as e:
                    out.append(e)
            return out

    def encode_texts(self, convs: Sequence[Conversation]) -> list[Example]:
        """Plain documents: tokenizer's own special tokens (its BOS, if any), then EOS appended; every token trained."""
        if self.eos_id is None:
            raise ConfigError("the tokenizer has no eos token; format: text needs one to end each document")
        encoded = self.tokenizer([c.text for c in convs], add_special_tokens=True)["input_ids"]
        out = []
        for c, ids in zip(convs, encoded):
            ids = list(ids) if ids[-1:] == [self.eos_id] else list(ids) + [self.eos_id]
            mask = np.ones(len(ids), bool)
            mask[0] = False
            out.append(Example(np.asarray(ids, np.int32), mask, 0, -1, None, c.source, c.number))
        return out

    def encode_chats(self, convs: Sequence[Conversation], loss_on: str) -> list[Example | str]:
        """Render and tokenize conversations; each result is an `Example` or why the template cannot render it."""
        self.require_template("data")
        full = self._render([list(c.messages) for c in convs], False)
        turns = [[j for j, m in enumerate(c.messages) if m["role"] == "assistant"] for c in convs]
        gen_req = [list(c.messages[:j]) for c, js in zip(convs, turns) for j in js]
        end_req = [list(c.messages[: j + 1]) for c, js in zip(convs, turns) for j in js if j + 1 < len(c.messages)]
        gen_out, end_out = iter(self._render(gen_req, True)), iter(self._render(end_req, False))

        plans: list[list[tuple[str, int]] | str] = []  # per conversation: (piece, message index or -1 for prompt)
        for c, js, text in zip(convs, turns, full):
            gens = [next(gen_out) for _ in js]
            ends = [next(end_out) if j + 1 < len(c.messages) else text for j in js]
            plans.append(_plan(text, js, gens, ends))

        pieces, at_start = [], []
        for plan in plans:
            if not isinstance(plan, str):
                pieces += [p for p, _ in plan]
                at_start += [k == 0 for k in range(len(plan))]
        encoded = iter(self._encode_pieces(pieces, at_start))
        out: list[Example | str] = []
        for c, js, plan in zip(convs, turns, plans):
            if isinstance(plan, str):
                out.append(plan)
                continue
            out.append(self._assemble(c, js, plan, [next(encoded) for _ in plan], loss_on))
        return out

    def _assemble(self, c: Conversation, turns: list[int], plan, piece_ids, loss_on: str) -> Example:
        if loss_on == "assistant":
            trained = set(turns)
        elif loss_on == "completion":
            trained = {j for j in turns if j >= c.final_start}
        elif loss_on == "last_turn":
            trained = {turns[-1]}
        else:
            trained = set(turns)
        ids: list[int] = []
        mask: list[bool] = []
        starts: dict[int, int] = {}
        for (_, j), p in zip(plan, piece_ids):
            if j >= 0:
                starts[j] = len(ids)
            n_trained = 0
            if j in trained:
                last_special = max((k for k, t in enumerate(p) if t in self.special_ids), default=len(p) - 1)
                n_trained = last_special + 1
            ids += p
            mask += [True] * n_trained + [False] * (len(p) - n_trained)
        shift = 0
        if self.adds_bos and ids[:1] != [self.bos_id]:
            ids, mask, shift = [self.bos_id] + ids, [False] + mask, 1
        mask_np = np.asarray(mask, bool) if loss_on != "all" else np.ones(len(ids), bool)
        mask_np[0] = False
        keep_from = shift + starts[min(j for j in turns if j >= c.final_start)]
        ends_with_answer = c.messages[-1]["role"] == "assistant"
        return Example(
            ids=np.asarray(ids, np.int32),
            mask=mask_np,
            keep_from=keep_from,
            prompt_end=shift + starts[turns[-1]] if ends_with_answer else -1,
            reference=c.messages[-1]["content"] if ends_with_answer else None,
            source=c.source,
            number=c.number,
        )


def _plan(text, turns, gens, ends) -> list[tuple[str, int]] | str:
    """Cut the rendered conversation into (piece, -1) prompt pieces and (piece, j) answers, or say why not."""
    if isinstance(text, Exception):
        return f"chat template failed ({type(text).__name__}: {str(text).splitlines()[0][:200] if str(text) else ''})"
    plan: list[tuple[str, int]] = []
    pos = 0
    for j, g, e in zip(turns, gens, ends):
        for r in (g, e):
            if isinstance(r, Exception):
                return f"chat template failed on a prefix ({type(r).__name__}: {str(r).splitlines()[0][:200] if str(r) else ''})"
        if not (text.startswith(g) and text.startswith(e) and pos <= len(g) <= len(e)):
            return f"chat template renders the prefix up to message {j} differently from the whole conversation"
        if len(g) > pos:
            plan.append((text[pos : len(g)], -1))
        plan.append((text[len(g) : len(e)], j))
        pos = len(e)
    if pos < len(text):
        plan.append((text[pos:], -1))
    return plan
