"""A plugin registered as a class (``plugins.load: [tests.plugins_for_tests.word_filter:WordFilter]``).

wirehub creates one instance per server: ``wirehub_configure`` parses ``extensions.word_filter`` into
``self.settings``, and ``wirehub_filter_message`` masks the configured words with it. Two servers in one
process with different configs mask different words: the state is the instance's, not the module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wirehub import Config, Session, hookimpl, parse_block


@dataclass(frozen=True)
class WordFilterConfig:
    words: tuple[str, ...] = ()
    mask: str = "***"


class WordFilter:
    def __init__(self) -> None:
        self.settings = WordFilterConfig()

    @hookimpl
    def wirehub_configure(self, config: Config) -> None:
        self.settings = parse_block(WordFilterConfig, config.extensions.get("word_filter"), "extensions.word_filter")

    @hookimpl
    def wirehub_filter_message(self, session: Session | None, room: str, data: Any) -> Any:
        if not (isinstance(data, dict) and isinstance(data.get("text"), str)):
            return None
        text = data["text"]
        for word in self.settings.words:
            text = text.replace(word, self.settings.mask)
        return {**data, "text": text}


#: the same class as an entry point would name it, to check that it is instantiated only once
AGAIN = WordFilter
