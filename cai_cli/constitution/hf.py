"""Hugging Face's llm-swarm constitutional-ai example (used by the alignment-handbook recipe)::

    {"constitutions": [{"critic": ..., "revision": ...}, ...],
     "system_chat": [[{"role": "user", "content": ...}, {"role": "assistant", ...}, ...], ...]}

or the older bare list of critic/revision pairs. Principle ids are ``hf-0``, ``hf-1``, ... Each
``system_chat`` conversation is user prompt, assistant answer (possibly after earlier turns),
then user critique request, assistant critique, user revision request, assistant revision
(system messages are skipped). Earlier turns stay in the example's prompt as a transcript.
"""

from __future__ import annotations

from pathlib import Path

from cai_cli.data import transcripts
from cai_cli.constitution.common import DraftPrinciple, FewShotExample, Part, repeats, required_text
from cai_cli.errors import UserError


def from_json(path: Path, data: dict) -> Part:
    unknown = set(data) - {"constitutions", "system_chat"}
    if unknown:
        raise UserError(
            f"{path}: unknown key '{min(unknown, key=str)}'; "
            "a Hugging Face constitution has only constitutions and system_chat"
        )
    entries = data["constitutions"]
    if not isinstance(entries, list):
        raise UserError(f"{path}: 'constitutions' must be a list of {{critic, revision}} objects")
    principles = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(
                f"{path}: constitutions[{index}]: expected an object with critic and revision"
            )
        critique = required_text(path, f"constitutions[{index}].critic", entry.get("critic"))
        revision = required_text(path, f"constitutions[{index}].revision", entry.get("revision"))
        principles.append(DraftPrinciple(f"hf-{index}", critique, revision, None))

    chats = data.get("system_chat") or []
    if not isinstance(chats, list):
        raise UserError(f"{path}: 'system_chat' must be a list of conversations")
    few_shot = []
    for index, chat in enumerate(chats):
        where = f"system_chat[{index}]"
        if not isinstance(chat, list) or not all(isinstance(m, dict) for m in chat):
            raise UserError(f"{path}: {where}: expected a list of {{role, content}} messages")
        turns = [
            (m.get("role"), required_text(path, f"{where}.content", m.get("content")))
            for m in chat
            if m.get("role") != "system"
        ]
        roles = [role for role, _ in turns]
        if len(turns) < 6 or not repeats(roles, ("user", "assistant")):
            raise UserError(
                f"{path}: {where}: expected alternating user/assistant messages: prompt, answer, "
                "critique request, critique, revision request, revision"
            )
        texts = [body for _, body in turns]
        few_shot.append(FewShotExample(transcripts.join(texts[:-5]), *texts[-5:]))
    return Part(path, "hf", principles=principles, few_shot=few_shot)
