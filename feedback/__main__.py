"""``python -m feedback``: run the feedback aggregator until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

from feedback.service import FeedbackService
from lookalike import logs
from lookalike.runtime import serve
from lookalike.settings import FeedbackSettings
from lookalike.topics import ensure_topics_if_allowed as ensure_topics

log = logging.getLogger("feedback")


def main() -> None:
    settings = FeedbackSettings()
    logs.configure(settings.log_format, "feedback")
    ensure_topics(settings)
    log.info("feedback aggregator %s: feedback %s, replies %s, triggers %s", settings.feedback_group,
             settings.feedback_topic, settings.replies_topic, settings.triggers_topic)
    serve(FeedbackService(settings).run)


if __name__ == "__main__":
    main()
