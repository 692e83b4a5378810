"""Whole logins against the login state machine: stages, CHAP (checked with an independent MD5
computation), discovery, and the status codes of the refusals."""

from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import dataclass, field

import pytest

from blockmirror.frontend.iscsi_chap import ChapSecrets
from blockmirror.frontend.iscsi_keys import KeyPolicy
from blockmirror.frontend.iscsi_login import (
    MAX_LOGIN_REQUESTS,
    LoginConfig,
    LoginFailure,
    LoginIdentity,
    LoginMachine,
    LoginStatus,
    LoginStep,
    LoginSuccess,
    SessionType,
    Target,
)
from blockmirror.frontend.iscsi_pdu import LoginRequest, LoginResponse, payload
from blockmirror.frontend.iscsi_text import decode_text, encode_text

INITIATOR = "iqn.2026-12.org.example:host"
TARGET = "iqn.2026-12.org.example:store:vol"
ISID = 0x80_12_34_56_78_9A
SECRETS = ChapSecrets(
    user="alice", secret=b"initiator-secret", mutual_user="store", mutual_secret=b"target-secret"
)
NEW_TSIH = 0x21


@dataclass
class Initiator:
    """A scripted initiator: sends Login Requests with text, reads the one response."""

    machine: LoginMachine
    isid: int = ISID
    tsih: int = 0
    itt: int = 0x100
    cmd_sn: int = 42
    steps: list[LoginStep] = field(default_factory=list)

    def send(
        self,
        pairs: list[tuple[str, str]],
        *,
        csg: int,
        nsg: int = 0,
        transit: bool = False,
        cont: bool = False,
        data: bytes | None = None,
    ) -> LoginResponse:
        # A new ITT each request, as libiscsi does: the response must echo it.
        self.itt += 1
        request = LoginRequest(
            isid=self.isid, itt=self.itt, tsih=self.tsih, cid=1, cmd_sn=self.cmd_sn,
            exp_stat_sn=7, csg=csg, nsg=nsg, transit=transit, cont=cont,
            data=(encode_text(pairs) if data is None else data,),
        )  # fmt: skip
        step = self.machine.handle(request)
        self.steps.append(step)
        assert len(step.responses) == 1
        response = step.responses[0]
        assert response.itt == self.itt and response.isid == self.isid
        return response

    @property
    def outcome(self) -> LoginSuccess | LoginFailure | None:
        return self.steps[-1].outcome

    def success(self) -> LoginSuccess:
        assert isinstance(self.outcome, LoginSuccess), self.outcome
        return self.outcome

    def failure(self) -> LoginStatus:
        assert isinstance(self.outcome, LoginFailure), self.outcome
        return self.outcome.status


def keys(response: LoginResponse) -> dict[str, str]:
    return dict(decode_text(payload(response.data)))


def status(response: LoginResponse) -> int:
    return response.status_class << 8 | response.status_detail


@dataclass
class Setup:
    config: LoginConfig = field(default_factory=LoginConfig)
    targets: dict[str, Target] = field(default_factory=lambda: {TARGET: Target(TARGET, "vol")})
    admitted: list[LoginIdentity] = field(default_factory=list)
    admit_answer: int | LoginStatus = NEW_TSIH

    def initiator(self, *, tsih: int = 0) -> Initiator:
        rng = random.Random(1234)
        machine = LoginMachine(
            self.config,
            find_target=self.targets.get,
            admit=self._admit,
            random_bytes=lambda n: bytes(rng.randrange(256) for _ in range(n)),
        )
        return Initiator(machine, tsih=tsih)

    def _admit(self, identity: LoginIdentity) -> int | LoginStatus:
        self.admitted.append(identity)
        return self.admit_answer


NAMES = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal")]
OPERATIONAL = [
    ("HeaderDigest", "CRC32C,None"),
    ("DataDigest", "None"),
    ("MaxRecvDataSegmentLength", "262144"),
    ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"),
    ("ImmediateData", "Yes"),
    ("InitialR2T", "Yes"),
    ("ErrorRecoveryLevel", "0"),
    ("IFMarker", "No"),
]


def md5(*parts: bytes) -> bytes:
    return hashlib.md5(b"".join(parts)).digest()


# --- logins that succeed --------------------------------------------------------------------


def test_a_login_straight_to_operational_without_authentication() -> None:
    setup = Setup()
    ini = setup.initiator()
    resp = ini.send(NAMES + OPERATIONAL, csg=1, nsg=3, transit=True)
    assert status(resp) == 0 and resp.transit and (resp.csg, resp.nsg) == (1, 3)
    assert resp.tsih == NEW_TSIH
    assert (resp.stat_sn, resp.exp_cmd_sn, resp.max_cmd_sn) == (7, 42, 42 + 127)
    answer = keys(resp)
    assert answer["TargetPortalGroupTag"] == "1"
    assert answer["MaxRecvDataSegmentLength"] == str(256 * 1024)  # ours, declared
    assert answer["TargetAlias"] == "vol"
    assert answer["HeaderDigest"] == "CRC32C" and answer["MaxBurstLength"] == "1048576"
    assert answer["IFMarker"] == "No"
    done = ini.success()
    assert done.tsih == NEW_TSIH and done.stat_sn == 8
    assert done.connection.header_digest and not done.connection.data_digest
    assert done.connection.max_send_data_segment_length == 262144
    assert done.session is not None and done.session.max_burst_length == 1048576
    assert done.session.first_burst_length == 65536
    (identity,) = setup.admitted
    assert identity == LoginIdentity(
        initiator_name=INITIATOR, isid=ISID, tsih=0, cid=1, session_type=SessionType.NORMAL,
        target=Target(TARGET, "vol"),
    )  # fmt: skip


def test_a_login_through_the_security_stage_with_auth_none() -> None:
    ini = Setup().initiator()
    resp = ini.send([*NAMES, ("AuthMethod", "None")], csg=0, nsg=1, transit=True)
    assert keys(resp) == {"AuthMethod": "None", "TargetPortalGroupTag": "1"}
    assert resp.transit and (resp.csg, resp.nsg) == (0, 1) and resp.tsih == 0
    resp = ini.send(OPERATIONAL, csg=1, nsg=3, transit=True)
    assert resp.transit and resp.stat_sn == 8 and resp.tsih == NEW_TSIH
    assert ini.success().stat_sn == 9


def test_the_operational_stage_may_take_several_requests() -> None:
    ini = Setup().initiator()
    resp = ini.send(NAMES + OPERATIONAL[:3], csg=1)
    assert not resp.transit and "MaxRecvDataSegmentLength" in keys(resp)
    assert ini.outcome is None
    resp = ini.send(OPERATIONAL[3:], csg=1, nsg=3, transit=True)
    assert resp.transit and "MaxRecvDataSegmentLength" not in keys(resp)  # declared once
    assert ini.success().connection.header_digest


def test_a_text_split_with_the_c_bit_is_gathered() -> None:
    ini = Setup().initiator()
    text = encode_text(NAMES + OPERATIONAL)
    resp = ini.send([], csg=1, cont=True, data=text[:50])
    assert not resp.data and not resp.transit and not resp.cont and status(resp) == 0
    resp = ini.send([], csg=1, nsg=3, transit=True, data=text[50:])
    assert resp.transit and keys(resp)["HeaderDigest"] == "CRC32C"
    ini.success()


def chap_login(setup: Setup, *, mutual: bool) -> tuple[Initiator, dict[str, str]]:
    """CHAP up to the target's challenge; returns the challenge keys."""
    ini = setup.initiator()
    resp = ini.send([*NAMES, ("AuthMethod", "CHAP,None")], csg=0, nsg=1, transit=True)
    assert keys(resp)["AuthMethod"] == "CHAP" and not resp.transit  # not authenticated yet
    resp = ini.send([("CHAP_A", "7,5")], csg=0)
    challenge = keys(resp)
    assert challenge["CHAP_A"] == "5"
    assert challenge["CHAP_C"].startswith("0x") and len(challenge["CHAP_C"]) == 2 + 32
    return ini, challenge


def chap_answer(
    challenge: dict[str, str], secret: bytes, name: str = "alice"
) -> list[tuple[str, str]]:
    identifier = int(challenge["CHAP_I"])
    c = bytes.fromhex(challenge["CHAP_C"][2:])
    return [("CHAP_N", name), ("CHAP_R", "0x" + md5(bytes([identifier]), secret, c).hex())]


def test_chap() -> None:
    setup = Setup(config=LoginConfig(chap=SECRETS))
    ini, challenge = chap_login(setup, mutual=False)
    resp = ini.send(chap_answer(challenge, b"initiator-secret"), csg=0, nsg=1, transit=True)
    assert status(resp) == 0 and resp.transit and (resp.csg, resp.nsg) == (0, 1)
    assert keys(resp) == {}
    ini.send(OPERATIONAL, csg=1, nsg=3, transit=True)
    assert ini.success().identity.chap_user == "alice"


def test_mutual_chap_and_a_base64_response() -> None:
    setup = Setup(config=LoginConfig(chap=SECRETS))
    ini, challenge = chap_login(setup, mutual=True)
    answer = chap_answer(challenge, b"initiator-secret")
    raw = bytes.fromhex(answer[1][1][2:])
    answer[1] = ("CHAP_R", "0b" + base64.b64encode(raw).decode())
    mutual_c = bytes(range(100, 116))
    resp = ini.send(
        [*answer, ("CHAP_I", "77"), ("CHAP_C", "0x" + mutual_c.hex())], csg=0, nsg=1, transit=True
    )
    assert status(resp) == 0 and resp.transit
    got = keys(resp)
    assert got["CHAP_N"] == "store"
    assert got["CHAP_R"] == "0x" + md5(bytes([77]), b"target-secret", mutual_c).hex()
    ini.send(OPERATIONAL, csg=1, nsg=3, transit=True)
    ini.success()


# --- authentication refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "name"),
    [(b"wrong-secret", "alice"), (b"initiator-secret", "mallory"), (b"target-secret", "alice")],
)
def test_a_wrong_chap_answer_is_an_authentication_failure(secret: bytes, name: str) -> None:
    ini, challenge = chap_login(Setup(config=LoginConfig(chap=SECRETS)), mutual=False)
    resp = ini.send(chap_answer(challenge, secret, name), csg=0, nsg=1, transit=True)
    assert status(resp) == 0x0201 and not resp.transit and not resp.data
    assert ini.failure() is LoginStatus.AUTHENTICATION_FAILURE


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param("reflect", id="our own challenge reflected"),
        pytest.param([("CHAP_I", "1")], id="mutual without CHAP_C"),
        pytest.param([("CHAP_I", "300"), ("CHAP_C", "0x01")], id="identifier out of range"),
        pytest.param([("CHAP_I", "1"), ("CHAP_C", "0xzz")], id="bad challenge"),
    ],
)
def test_bad_mutual_challenges_are_refused(extra: object) -> None:
    ini, challenge = chap_login(Setup(config=LoginConfig(chap=SECRETS)), mutual=True)
    if extra == "reflect":
        extra = [("CHAP_I", "3"), ("CHAP_C", challenge["CHAP_C"])]
    assert isinstance(extra, list)
    resp = ini.send(chap_answer(challenge, b"initiator-secret") + extra, csg=0, nsg=1, transit=True)
    assert status(resp) == 0x0201


def test_mutual_chap_without_a_mutual_secret_is_refused() -> None:
    setup = Setup(config=LoginConfig(chap=ChapSecrets("alice", b"initiator-secret")))
    ini, challenge = chap_login(setup, mutual=True)
    pairs = [*chap_answer(challenge, b"initiator-secret"), ("CHAP_I", "1"), ("CHAP_C", "0x0102")]
    assert status(ini.send(pairs, csg=0, nsg=1, transit=True)) == 0x0201


@pytest.mark.parametrize(
    ("pairs", "csg", "nsg"),
    [
        pytest.param([*NAMES, ("AuthMethod", "None")], 0, 1, id="AuthMethod None offered"),
        pytest.param(NAMES + OPERATIONAL, 1, 3, id="security stage skipped"),
        pytest.param(NAMES, 0, 1, id="leaving without AuthMethod"),
    ],
)
def test_chap_is_required_when_configured(pairs: list[tuple[str, str]], csg: int, nsg: int) -> None:
    ini = Setup(config=LoginConfig(chap=SECRETS)).initiator()
    assert status(ini.send(pairs, csg=csg, nsg=nsg, transit=True)) == 0x0201


def test_chap_keys_in_the_wrong_order_fail() -> None:
    ini = Setup(config=LoginConfig(chap=SECRETS)).initiator()
    ini.send([*NAMES, ("AuthMethod", "CHAP")], csg=0)
    assert status(ini.send([("CHAP_N", "alice"), ("CHAP_R", "0x00")], csg=0)) == 0x0201
    ini = Setup(config=LoginConfig(chap=SECRETS)).initiator()
    ini.send([*NAMES, ("AuthMethod", "CHAP")], csg=0)
    assert status(ini.send([("CHAP_A", "6,7")], csg=0)) == 0x0201  # no MD5 offered


def test_skipping_to_operational_during_chap_is_an_authentication_failure() -> None:
    ini, _challenge = chap_login(Setup(config=LoginConfig(chap=SECRETS)), mutual=False)
    assert status(ini.send(OPERATIONAL, csg=1, nsg=3, transit=True)) == 0x0201


# --- discovery ------------------------------------------------------------------------------


DISCOVERY = [("InitiatorName", INITIATOR), ("SessionType", "Discovery")]


def test_a_discovery_session_needs_no_target_and_no_chap_by_default() -> None:
    setup = Setup(config=LoginConfig(chap=SECRETS))
    ini = setup.initiator()
    resp = ini.send([*DISCOVERY, ("AuthMethod", "None")], csg=0, nsg=1, transit=True)
    assert keys(resp) == {"AuthMethod": "None"} and resp.transit  # no TargetPortalGroupTag
    resp = ini.send(
        [("MaxBurstLength", "4096"), ("HeaderDigest", "None")], csg=1, nsg=3, transit=True
    )
    got = keys(resp)
    assert got["MaxBurstLength"] == "Irrelevant" and "TargetAlias" not in got
    done = ini.success()
    assert done.identity.session_type is SessionType.DISCOVERY and done.identity.target is None


def test_discovery_may_require_chap_or_be_refused() -> None:
    ini = Setup(config=LoginConfig(chap=SECRETS, chap_on_discovery=True)).initiator()
    assert (
        status(ini.send([*DISCOVERY, ("AuthMethod", "None")], csg=0, nsg=1, transit=True)) == 0x0201
    )
    ini = Setup(config=LoginConfig(allow_discovery=False)).initiator()
    assert status(ini.send(DISCOVERY, csg=1, nsg=3, transit=True)) == 0x0209


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "code"),
    [
        pytest.param([NAMES[0], ("TargetName", TARGET + "x")], 0x0203, id="unknown target"),
        pytest.param([NAMES[0], ("TargetName", TARGET.upper())], 0, id="names fold case"),
        pytest.param([("TargetName", TARGET)], 0x0207, id="no InitiatorName"),
        pytest.param([("InitiatorName", INITIATOR)], 0x0207, id="no TargetName"),
        pytest.param([*NAMES[:2], ("SessionType", "Weird")], 0x0209, id="bad SessionType"),
        pytest.param([*NAMES, ("AuthMethod", "None")], 0x0200, id="security key in stage 1"),
        pytest.param([*NAMES, ("CHAP_A", "5")], 0x0200, id="CHAP key in stage 1"),
        pytest.param([*NAMES, ("MaxBurstLength", "Reject")], 0x0200, id="reserved answer offered"),
        pytest.param([*NAMES, ("TargetAlias", "x")], 0x0200, id="a target's key"),
    ],
)  # fmt: skip
def test_refusals_in_the_first_request(pairs: list[tuple[str, str]], code: int) -> None:
    ini = Setup().initiator()
    assert status(ini.send(pairs, csg=1, nsg=3, transit=True)) == code


def test_malformed_text_is_an_initiator_error() -> None:
    ini = Setup().initiator()
    assert status(ini.send([], csg=1, nsg=3, transit=True, data=b"InitiatorName=x")) == 0x0200


@pytest.mark.parametrize(
    ("csg", "nsg", "transit", "cont", "code"),
    [
        (2, 3, True, False, 0x0200),  # reserved stage
        (3, 3, False, False, 0x0200),  # full feature is no login stage
        (1, 0, True, False, 0x0200),  # backwards
        (1, 1, True, False, 0x0200),  # to the same stage
        (0, 2, True, False, 0x0200),  # to the reserved stage
        (1, 3, True, True, 0x0200),  # T and C together
    ],
)
def test_bad_stage_fields(csg: int, nsg: int, transit: bool, cont: bool, code: int) -> None:
    ini = Setup().initiator()
    assert status(ini.send(NAMES, csg=csg, nsg=nsg, transit=transit, cont=cont)) == code


def test_stages_never_go_back_or_skip_ahead() -> None:
    ini = Setup().initiator()
    ini.send([*NAMES, ("AuthMethod", "None")], csg=0, nsg=1, transit=True)
    assert status(ini.send([], csg=0)) == 0x020B  # back to security
    ini = Setup().initiator()
    ini.send([*NAMES, ("AuthMethod", "None")], csg=0)  # stays in security (T=0)
    assert status(ini.send(OPERATIONAL, csg=1, nsg=3, transit=True)) == 0x020B


def test_unsupported_version() -> None:
    ini = Setup().initiator()
    machine = ini.machine
    step = machine.handle(LoginRequest(isid=ISID, version_max=2, version_min=1, csg=1, data=()))
    assert isinstance(step.outcome, LoginFailure)
    assert status(step.responses[0]) == 0x0205


def test_the_session_identity_must_not_change() -> None:
    ini = Setup().initiator()
    ini.send(NAMES, csg=1)
    ini.isid += 1
    assert status(ini.send(OPERATIONAL, csg=1, nsg=3, transit=True)) == 0x0200
    ini = Setup().initiator()
    ini.send(NAMES, csg=1)
    changed = [("InitiatorName", "iqn.2026-12.org.example:other")]
    assert status(ini.send(changed, csg=1, nsg=3, transit=True)) == 0x0200
    ini = Setup().initiator()
    ini.send(NAMES, csg=1)
    resp = ini.send([*NAMES, *OPERATIONAL], csg=1, nsg=3, transit=True)  # repeated: fine
    assert status(resp) == 0


def test_a_key_negotiated_twice_is_an_initiator_error() -> None:
    ini = Setup().initiator()
    ini.send([*NAMES, ("MaxBurstLength", "4096")], csg=1)
    assert status(ini.send([("MaxBurstLength", "4096")], csg=1, nsg=3, transit=True)) == 0x0200


def test_authorization_failure_after_authentication() -> None:
    setup = Setup(
        config=LoginConfig(chap=SECRETS),
        targets={TARGET: Target(TARGET, initiators=frozenset({"iqn.2026-12.org.example:other"}))},
    )
    ini, challenge = chap_login(setup, mutual=False)
    ini.send(chap_answer(challenge, b"initiator-secret"), csg=0, nsg=1, transit=True)
    assert status(ini.send(OPERATIONAL, csg=1, nsg=3, transit=True)) == 0x0202
    assert setup.admitted == []  # never asked to place a connection it refuses


def test_the_adapter_places_or_refuses_the_connection() -> None:
    setup = Setup(admit_answer=LoginStatus.SESSION_DOES_NOT_EXIST)
    ini = setup.initiator(tsih=9)
    assert status(ini.send(NAMES + OPERATIONAL, csg=1, nsg=3, transit=True)) == 0x020A
    assert setup.admitted[0].tsih == 9
    setup = Setup(admit_answer=9)
    ini = setup.initiator(tsih=9)
    resp = ini.send(NAMES + OPERATIONAL, csg=1, nsg=3, transit=True)
    assert resp.tsih == 9 and keys(resp)["InitialR2T"] == "Irrelevant"  # session-wide
    done = ini.success()
    assert done.session is None and done.connection.header_digest
    setup = Setup(admit_answer=10)  # a joining connection must keep its TSIH
    ini = setup.initiator(tsih=9)
    assert status(ini.send(NAMES, csg=1, nsg=3, transit=True)) == 0x0300


def test_we_offer_a_required_digest_before_completing() -> None:
    setup = Setup(config=LoginConfig(keys=KeyPolicy(header_digests=("CRC32C",))))
    ini = setup.initiator()
    resp = ini.send(NAMES, csg=1, nsg=3, transit=True)
    assert not resp.transit and keys(resp)["HeaderDigest"] == "CRC32C" and ini.outcome is None
    resp = ini.send([("HeaderDigest", "CRC32C")], csg=1, nsg=3, transit=True)
    assert resp.transit and ini.success().connection.header_digest
    ini = setup.initiator()
    ini.send(NAMES, csg=1, nsg=3, transit=True)
    assert status(ini.send([("HeaderDigest", "None")], csg=1, nsg=3, transit=True)) == 0x0200


def test_nothing_after_the_end() -> None:
    ini = Setup().initiator()
    ini.send(NAMES + OPERATIONAL, csg=1, nsg=3, transit=True)
    ini.success()
    assert status(ini.send([], csg=1, nsg=3, transit=True)) == 0x020B


def test_abort_answers_the_last_request() -> None:
    ini = Setup().initiator()
    assert ini.machine.abort(LoginStatus.INITIATOR_ERROR, "no request").responses == ()
    ini = Setup().initiator()
    ini.send(NAMES, csg=1)
    ini.send([], csg=1)
    step = ini.machine.abort(LoginStatus.INITIATOR_ERROR, "a SCSI command during login")
    assert status(step.responses[0]) == 0x0200 and isinstance(step.outcome, LoginFailure)
    assert step.responses[0].itt == ini.itt  # the last request's tag
    assert ini.machine.finished


def test_a_login_that_never_converges_is_ended() -> None:
    ini = Setup().initiator()
    ini.send(NAMES, csg=1)
    for _ in range(MAX_LOGIN_REQUESTS - 1):
        assert status(ini.send([], csg=1)) == 0
    assert status(ini.send([], csg=1)) == 0x0200


def test_chap_secrets_are_checked() -> None:
    with pytest.raises(ValueError):
        ChapSecrets("alice", b"")
    with pytest.raises(ValueError):
        ChapSecrets("alice", b"same", mutual_user="store", mutual_secret=b"same")
    with pytest.raises(ValueError):
        ChapSecrets("alice", b"secret", mutual_user="store")
