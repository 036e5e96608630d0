"""Control records: only a command signed with the processor's key, recent and new, is taken;
every other record is refused with a reason and nothing raises."""

import json

import pytest

from pipeline.config import ControlConfig
from pipeline.stream_io.control import (MAX_TAKEN, CommandLedger, CommandVerifier, ControlCommand, control_key,
                                        parse_command, sign_command)

KEY = b"k" * 32
NOW = 1_800_000_000.0
CONFIG = ControlConfig(max_age_s=300)


STREAM, GROUP = "s", "g"


def verifier(key=KEY, ledger=None, stream=STREAM, group=GROUP):
    return CommandVerifier(key, CONFIG, stream, group, ledger, clock=lambda: NOW)


def signed(message, key=KEY, at=NOW):
    return json.dumps(sign_command(message, key, now=at)).encode()


ROLLBACK = {"action": "rollback", "to": 3, "request_id": "r1", "stream": STREAM, "group": GROUP}


def test_a_signed_command_is_taken_once():
    check = verifier()
    value = signed(ROLLBACK)
    assert parse_command(value, check) == ControlCommand("rollback", "3", "r1")
    assert parse_command(value, check) == "refused: replayed command"


@pytest.mark.parametrize("value, reason", [
    (json.dumps(ROLLBACK).encode(), "refused: unsigned command"),
    (signed(ROLLBACK, key=b"another key"), "refused: bad signature"),
    (signed(ROLLBACK, at=NOW - 301), "refused: expired: issued 301 s ago"),
    (signed(ROLLBACK, at=NOW + 3600), "refused: expired: issued -3600 s ago"),
    # Bound to one stream: signed for another stream, or another group of the same, it is refused.
    (signed({**ROLLBACK, "stream": "other"}), "refused: for another stream"),
    (signed({**ROLLBACK, "group": "other"}), "refused: for another stream"),
    (signed({k: v for k, v in ROLLBACK.items() if k != "stream"}), "refused: for another stream"),
    # The signature covers every field: the same signature with another target is refused.
    (json.dumps({**sign_command(ROLLBACK, KEY, now=NOW), "to": "base"}).encode(), "refused: bad signature"),
    (b'{"action": "rollback", "to": NaN}', "bad JSON: NaN is not JSON"),
    (b'{"action": "rollback", "to": ' + b"[" * 3000 + b"]" * 3000 + b"}", "too large"),
    (b'{"action": "rollback", "to": ' + b"[" * 100 + b"]" * 100 + b"}", "JSON nested deeper than 32"),
    (b'{"action": "rollback", "to": "' + b"9" * 100 + b'"}', "rollback needs 'to'"),
    (b'{"action": "\\ud800"}', "invalid UTF-8: lone surrogate"),
    (b"\xff", "invalid UTF-8"),
    (b'{"action": "drop-everything"}', "unknown action 'drop-everything'"),
])
def test_other_records_are_refused_with_a_reason(value, reason):
    got = parse_command(value, verifier())
    assert isinstance(got, str) and got.startswith(reason), got


def test_without_a_key_on_the_processor_every_command_is_refused():
    assert control_key(CONFIG, environ={}) is None
    assert control_key(CONFIG, environ={"TTT_STREAM_CONTROL_KEY": "s3cret"}) == b"s3cret"
    got = parse_command(signed(ROLLBACK), verifier(key=None))
    assert got == "refused: no control key in $TTT_STREAM_CONTROL_KEY on the processor"


def test_a_command_signed_as_the_readme_shows_is_taken():
    import hashlib
    import hmac

    command = {"action": "rollback", "to": "last-good", "request_id": "r1", "issued_at": NOW - 5,
               "stream": STREAM, "group": GROUP}
    body = json.dumps(command, sort_keys=True, separators=(",", ":")).encode()
    command["signature"] = hmac.new(KEY, body, hashlib.sha256).hexdigest()
    assert parse_command(json.dumps(command).encode(), verifier()) == ControlCommand("rollback", "last-good", "r1")


def test_a_signed_forget_names_its_key_and_a_forget_without_one_is_refused():
    bound = {"stream": STREAM, "group": GROUP}
    got = parse_command(signed({"action": "forget", "key": "tenant-7", "request_id": "f1", **bound}), verifier())
    assert got == ControlCommand("forget", request_id="f1", key="tenant-7")
    assert parse_command(signed({"action": "forget", **bound}), verifier()).startswith("forget needs 'key'")
    assert parse_command(signed({"action": "forget", "key": "k" * 600, **bound}),
                         verifier()).startswith("forget needs 'key'")
    assert parse_command(json.dumps({"action": "forget", "key": "tenant-7"}).encode(), verifier()) == \
        "refused: unsigned command"


def test_a_command_taken_before_a_restart_is_refused_after_it():
    """The ledger of taken commands goes into the checkpoint as JSON and comes back from it."""
    ledger = CommandLedger()
    value = signed(ROLLBACK)
    assert parse_command(value, verifier(ledger=ledger)) == ControlCommand("rollback", "3", "r1")
    recorded = json.loads(json.dumps(ledger.as_dict()))  # what the manifest holds
    restarted = verifier(ledger=CommandLedger.from_dict(recorded))
    assert parse_command(value, restarted) == "refused: replayed command"
    assert parse_command(signed({**ROLLBACK, "request_id": "r2"}), restarted) == ControlCommand("rollback", "3", "r2")


def test_the_ledger_stays_bounded_and_refuses_what_it_no_longer_lists():
    ledger = CommandLedger()
    for i in range(MAX_TAKEN + 10):
        assert ledger.take(f"sig-{i}", NOW - 100 + i * 0.01, NOW, 300) is None
    assert len(ledger.taken) == MAX_TAKEN and ledger.floor == NOW - 100 + 9 * 0.01
    # The oldest signatures went: a replay of one of them is still refused, by the floor.
    assert ledger.take("sig-0", NOW - 100, NOW, 300).startswith("refused: replayed command")
    assert ledger.take("new", NOW, NOW, 300) is None
    # Signatures older than max_age go by themselves (the age check refuses those commands anyway).
    assert ledger.take("later", NOW + 1000, NOW + 1000, 300) is None and len(ledger.taken) == 1
