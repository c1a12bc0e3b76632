"""``python -m feedback``: run the feedback aggregator until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import faust

from feedback.service import create_app
from lookalike.settings import FeedbackSettings
from lookalike.topics import ensure_topics_if_allowed as ensure_topics

log = logging.getLogger("feedback")


def main() -> None:
    settings = FeedbackSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_topics(settings)
    log.info("feedback aggregator %s: feedback %s, replies %s, triggers %s", settings.feedback_group,
             settings.feedback_topic, settings.replies_topic, settings.triggers_topic)
    faust.Worker(create_app(settings), loglevel="INFO").execute_from_commandline()


if __name__ == "__main__":
    main()
