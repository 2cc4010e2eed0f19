"""Fake ``modules.call_queue``: the Web-UI's generation lock."""

import threading

queue_lock = threading.Lock()
