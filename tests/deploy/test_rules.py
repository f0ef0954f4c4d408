"""deploy/'s Prometheus config and alert rules, checked by Prometheus' own promtool; every alert is unit-tested in
deploy/alerts_test.yml, firing where it should and silent where it should not (an alert that fires for a series
the test does not expect fails it)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from .prometheus import DEPLOY, NOT_INSTALLED, PROMTOOL

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason=NOT_INSTALLED)


def promtool(*args: str) -> str:
    done = subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_the_config_and_its_rule_files_are_valid():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_the_rules_are_valid():
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")


def test_every_alert_is_shown_firing_and_silent_by_its_unit_tests():
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    cases = [case for test in yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts, "an alert is never shown to fire"
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts, "an alert is never shown silent"
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")
