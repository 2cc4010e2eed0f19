"""A fake of the A1111 Web-UI's ``modules`` package: only the surface TrainTrain touches.

Put on ``sys.path`` by ``tests/webui/conftest.py`` only; state lives in module globals as in A1111.
"""
