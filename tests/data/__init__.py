"""Tests for trainer.data (a package so test module names cannot collide with other folders')."""
