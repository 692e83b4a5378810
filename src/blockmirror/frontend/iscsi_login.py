"""The login phase of one iSCSI connection, target side, sans-I/O (RFC 7143 sections 6 and 11.12).

Feed each Login Request to :meth:`LoginMachine.handle`; it returns the Login Responses to send
and, once the login ends, its outcome: :class:`LoginSuccess` (the connection is in full feature
phase, with the negotiated parameters) or :class:`LoginFailure` (the response carries the
status; close the connection after sending it).

A login moves through SecurityNegotiation (stage 0), LoginOperationalNegotiation (1) and
FullFeaturePhase (3). The initiator asks to leave a stage with T=1 and names the next one
(NSG); we agree with T=1 or keep it there with T=0. It may skip the security stage when no
authentication is required (start with CSG=1, or go from 0 straight to 3). Stages never go
back: a request in any stage but the current one is "invalid during login" (0x020b), or an
authentication failure (0x0201) when it skips authentication we require. A text split over
several requests (C=1) is gathered and each part acknowledged with an empty response.

The first complete text names the initiator (InitiatorName) and, for a normal session, the
target (TargetName, looked up with ``find_target``). Whether the connection starts a session
(TSIH 0) or joins one is the adapter's decision, made at the last step through ``admit``: it
receives the :class:`LoginIdentity` once authentication and negotiation are over, and returns
the TSIH or the status that refuses the login. Doing it last means nothing (a session
reinstated, a TSIH spent) happens for an initiator that has not proved itself.

Each response echoes the request's Initiator Task Tag, takes the next StatSN of the
connection (the first is the ExpStatSN of the first request), and opens the command window
from the request's CmdSN: ExpCmdSN = CmdSN, MaxCmdSN = CmdSN + command_window - 1. On a
connection joining a session the adapter may replace those two with the session's own.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from blockmirror.errors import ProtocolError
from blockmirror.frontend.iscsi_chap import CHAP_KEYS, ChapExchange, ChapFailure, ChapSecrets
from blockmirror.frontend.iscsi_keys import (
    ConnectionParams,
    KeyPolicy,
    Negotiation,
    SessionParams,
)
from blockmirror.frontend.iscsi_pdu import (
    LOGIN_SEGMENT,
    LoginRequest,
    LoginResponse,
    Stage,
    payload,
)
from blockmirror.frontend.iscsi_serial import max_cmd_sn_for, serial_add
from blockmirror.frontend.iscsi_text import Pairs, TextError, decode_text, encode_text, parse_list


class LoginStatus(enum.IntEnum):
    """Status-Class (high byte) and Status-Detail (low byte) of a Login Response (11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    TARGET_NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class SessionType(enum.Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


VERSION = 0x00  # the only iSCSI version there is
MAX_NAME = 223  # iSCSI names are at most 223 bytes (section 4.2.7.1)
MAX_LOGIN_REQUESTS = 64  # a login that needs more is not converging
MAX_LOGIN_TEXT = 64 * 1024  # the text one run of C=1 requests may gather
NAME_KEYS = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType"})
SECURITY_KEYS = CHAP_KEYS | {"AuthMethod"}


@dataclass(frozen=True, slots=True)
class Target:
    """What the login needs of a target: its name, its alias, who may log in (None: anyone)."""

    name: str
    alias: str | None = None
    initiators: frozenset[str] | None = None

    def admits(self, initiator_name: str) -> bool:
        return self.initiators is None or initiator_name.lower() in self.initiators


@dataclass(frozen=True, slots=True)
class LoginConfig:
    keys: KeyPolicy = field(default_factory=KeyPolicy)
    chap: ChapSecrets | None = None  # None: no authentication
    chap_on_discovery: bool = False  # discovery sessions authenticate too
    allow_discovery: bool = True
    portal_group_tag: int = 1
    command_window: int = 128


@dataclass(frozen=True, slots=True)
class LoginIdentity:
    """Who logs in, for the adapter's ``admit``: the session is (initiator_name, isid, target)."""

    initiator_name: str
    isid: int
    tsih: int  # as the initiator sent it: 0 to start a session, else the session to join
    cid: int
    session_type: SessionType
    target: Target | None  # None for a discovery session
    initiator_alias: str | None = None
    chap_user: str | None = None  # the CHAP_N the initiator proved


@dataclass(frozen=True, slots=True)
class LoginSuccess:
    identity: LoginIdentity
    tsih: int
    connection: ConnectionParams
    session: SessionParams | None  # None on a connection joining a session: keep the session's
    stat_sn: int  # the StatSN of the next response on this connection
    exp_cmd_sn: int
    max_cmd_sn: int


@dataclass(frozen=True, slots=True)
class LoginFailure:
    status: LoginStatus
    reason: str


@dataclass(frozen=True, slots=True)
class LoginStep:
    responses: tuple[LoginResponse, ...]
    outcome: LoginSuccess | LoginFailure | None = None


FindTarget = Callable[[str], Target | None]
# The adapter's decision at the end of a login: the TSIH (a new one for TSIH 0, the same one
# for a connection joining a session), or the status refusing the login.
Admit = Callable[[LoginIdentity], int | LoginStatus]


class _Refused(ProtocolError):
    def __init__(self, status: LoginStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class LoginMachine:
    """The login of one connection. ``find_target`` gets a target name in lower case."""

    def __init__(
        self,
        config: LoginConfig,
        *,
        find_target: FindTarget,
        admit: Admit,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._config = config
        self._find_target = find_target
        self._admit = admit
        self._random = random_bytes
        self._first: LoginRequest | None = None
        self._last: LoginRequest | None = None
        self._stage = Stage.SECURITY
        self._stat_sn = 0
        self._requests = 0
        self._text = b""
        self._identity: LoginIdentity | None = None
        self._names: dict[str, str] = {}
        self._negotiation = Negotiation(config.keys)
        self._auth_method: str | None = None
        self._chap: ChapExchange | None = None
        self.finished = False

    def handle(self, request: LoginRequest) -> LoginStep:
        if self.finished:
            return self._failure(request, LoginStatus.INVALID_DURING_LOGIN, "login is over")
        try:
            return self._handle(request)
        except _Refused as exc:
            return self._failure(request, exc.status, str(exc))
        except ChapFailure as exc:
            return self._failure(request, LoginStatus.AUTHENTICATION_FAILURE, str(exc))
        except TextError as exc:
            return self._failure(request, LoginStatus.INITIATOR_ERROR, str(exc))

    def abort(self, status: LoginStatus, reason: str) -> LoginStep:
        """End the login from outside (a PDU other than a Login Request, a framing error): the
        failure response to send, if a request came at all, and the outcome."""
        self.finished = True
        if self._last is None:
            return LoginStep((), LoginFailure(status, reason))
        return self._failure(self._last, status, reason)

    # --- one request ------------------------------------------------------------------------

    def _handle(self, req: LoginRequest) -> LoginStep:
        self._last = req
        self._requests += 1
        if self._requests > MAX_LOGIN_REQUESTS:
            raise _Refused(LoginStatus.INITIATOR_ERROR, "too many login requests")
        self._check_header(req)
        self._text += payload(req.data)
        if len(self._text) > MAX_LOGIN_TEXT:
            raise _Refused(LoginStatus.OUT_OF_RESOURCES, "login text too long")
        if req.cont:
            # Acknowledge the part: an empty response, T=0 (section 6.3).
            return LoginStep((self._response(req, [], transit=False),))
        pairs, self._text = decode_text(self._text), b""
        answers: Pairs = []
        if self._identity is None:
            answers += self._identify(req, pairs)
        else:
            self._check_names(pairs)
        if req.csg == Stage.OPERATIONAL and not self._authenticated:
            raise _Refused(LoginStatus.AUTHENTICATION_FAILURE, "authentication is required")
        security = {k: v for k, v in pairs if k in SECURITY_KEYS}
        operational = [(k, v) for k, v in pairs if k not in SECURITY_KEYS | NAME_KEYS]
        if req.csg == Stage.SECURITY:
            answers += self._security(security)
        elif security:
            raise _Refused(LoginStatus.INITIATOR_ERROR, "security keys after the security stage")
        else:
            answers += self._declarations()
        answers += self._negotiation.answer(operational)
        return self._respond(req, answers)

    def _check_header(self, req: LoginRequest) -> None:
        if req.version_min > VERSION:
            raise _Refused(LoginStatus.UNSUPPORTED_VERSION, f"version {req.version_min}")
        if req.transit and req.cont:
            raise _Refused(LoginStatus.INITIATOR_ERROR, "T and C both set")
        if req.csg not in (Stage.SECURITY, Stage.OPERATIONAL):
            raise _Refused(LoginStatus.INITIATOR_ERROR, f"CSG {req.csg}")
        if req.transit and (req.nsg not in (Stage.OPERATIONAL, Stage.FULL_FEATURE)):
            raise _Refused(LoginStatus.INITIATOR_ERROR, f"NSG {req.nsg}")
        if req.transit and req.nsg <= req.csg:
            raise _Refused(LoginStatus.INITIATOR_ERROR, f"from stage {req.csg} to {req.nsg}")
        first = self._first
        if first is None:
            self._first = req
            self._stage = Stage(req.csg)
            self._stat_sn = req.exp_stat_sn
            self._negotiation = Negotiation(self._config.keys, leading=req.tsih == 0)
            return
        if (req.isid, req.tsih, req.cid) != (first.isid, first.tsih, first.cid):
            raise _Refused(LoginStatus.INITIATOR_ERROR, "ISID, TSIH or CID changed during login")
        if req.csg != self._stage:
            skips_auth = req.csg == Stage.OPERATIONAL and not self._authenticated
            status = (
                LoginStatus.AUTHENTICATION_FAILURE
                if skips_auth and self._auth_required
                else LoginStatus.INVALID_DURING_LOGIN
            )
            raise _Refused(status, f"a request in stage {req.csg} during stage {self._stage}")

    def _identify(self, req: LoginRequest, pairs: Pairs) -> Pairs:
        """The first complete text: who logs in, to what."""
        names = {k: v for k, v in pairs if k in NAME_KEYS}
        self._names = names
        initiator = names.get("InitiatorName")
        if not initiator:
            raise _Refused(LoginStatus.MISSING_PARAMETER, "no InitiatorName")
        if len(initiator.encode()) > MAX_NAME:
            raise _Refused(LoginStatus.INITIATOR_ERROR, "InitiatorName too long")
        try:
            session_type = SessionType(names.get("SessionType", SessionType.NORMAL.value))
        except ValueError:
            raise _Refused(
                LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {names['SessionType']!r}"
            ) from None
        target: Target | None = None
        answers: Pairs = []
        if session_type is SessionType.DISCOVERY:
            if not self._config.allow_discovery:
                raise _Refused(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, "no discovery sessions")
        else:
            target_name = names.get("TargetName")
            if not target_name:
                raise _Refused(LoginStatus.MISSING_PARAMETER, "no TargetName")
            target = self._find_target(target_name.lower())
            if target is None:
                raise _Refused(LoginStatus.TARGET_NOT_FOUND, f"no target {target_name!r}")
            # Declared in the answer to the first complete request naming a target (13.9).
            answers.append(("TargetPortalGroupTag", str(self._config.portal_group_tag)))
        self._negotiation.discovery = session_type is SessionType.DISCOVERY
        self._identity = LoginIdentity(
            initiator_name=initiator,
            isid=req.isid,
            tsih=req.tsih,
            cid=req.cid,
            session_type=session_type,
            target=target,
            initiator_alias=names.get("InitiatorAlias"),
        )
        return answers

    def _check_names(self, pairs: Pairs) -> None:
        for key, value in pairs:
            if key in NAME_KEYS and self._names.get(key, value) != value:
                raise _Refused(LoginStatus.INITIATOR_ERROR, f"{key} changed during login")

    # --- authentication ---------------------------------------------------------------------

    @property
    def _auth_required(self) -> bool:
        if self._config.chap is None:
            return False
        discovery = self._identity is not None and (
            self._identity.session_type is SessionType.DISCOVERY
        )
        return not discovery or self._config.chap_on_discovery

    @property
    def _authenticated(self) -> bool:
        if self._auth_required:
            return self._chap is not None and self._chap.done
        return True

    def _security(self, keys: dict[str, str]) -> Pairs:
        answers: Pairs = []
        if "AuthMethod" in keys:
            if self._auth_method is not None:
                raise _Refused(LoginStatus.INITIATOR_ERROR, "AuthMethod negotiated twice")
            acceptable = "CHAP" if self._auth_required else "None"
            if acceptable not in parse_list(keys["AuthMethod"]):
                raise _Refused(
                    LoginStatus.AUTHENTICATION_FAILURE,
                    f"AuthMethod {keys['AuthMethod']!r}: we need {acceptable}",
                )
            self._auth_method = acceptable
            answers.append(("AuthMethod", acceptable))
            if acceptable == "CHAP":
                assert self._config.chap is not None
                self._chap = ChapExchange(self._config.chap, random_bytes=self._random)
        chap_keys = {k: v for k, v in keys.items() if k in CHAP_KEYS}
        if chap_keys:
            if self._chap is None:
                raise _Refused(LoginStatus.INITIATOR_ERROR, "CHAP keys without AuthMethod=CHAP")
            answers += self._chap.step(chap_keys)
        return answers

    def _declarations(self) -> Pairs:
        """What we declare as the operational stage starts: our MaxRecvDataSegmentLength and,
        for a normal session, the target's alias."""
        out = self._negotiation.declarations()
        target = self._identity.target if self._identity else None
        if out and target is not None and target.alias:
            out.append(("TargetAlias", target.alias))
        return out

    # --- responses ----------------------------------------------------------------------------

    def _respond(self, req: LoginRequest, answers: Pairs) -> LoginStep:
        if not req.transit:
            return LoginStep((self._response(req, answers, transit=False),))
        if req.csg == Stage.SECURITY and not self._authenticated:
            if self._chap is None:
                # Asked to leave the security stage without even starting the authentication
                # we require: no later request can mend that.
                raise _Refused(LoginStatus.AUTHENTICATION_FAILURE, "authentication is required")
            return LoginStep((self._response(req, answers, transit=False),))
        if req.nsg == Stage.OPERATIONAL:
            self._stage = Stage.OPERATIONAL
            return LoginStep((self._response(req, answers, transit=True),))
        if not self._negotiation.awaiting_answers:
            offers = self._negotiation.completion_offers()
            if not offers:
                return self._complete(req, answers)
            answers += offers
        return LoginStep((self._response(req, answers, transit=False),))

    def _complete(self, req: LoginRequest, answers: Pairs) -> LoginStep:
        identity = self._identity
        assert identity is not None
        unmet = self._negotiation.unmet()
        if unmet is not None:
            raise _Refused(LoginStatus.INITIATOR_ERROR, unmet)
        if identity.target is not None and not identity.target.admits(identity.initiator_name):
            raise _Refused(
                LoginStatus.AUTHORIZATION_FAILURE,
                f"{identity.initiator_name!r} may not log in to {identity.target.name!r}",
            )
        identity = replace(identity, chap_user=self._chap.user if self._chap else None)
        admitted = self._admit(identity)
        if isinstance(admitted, LoginStatus):
            raise _Refused(admitted, "refused by the session table")
        if not 0 < admitted <= 0xFFFF or (identity.tsih and admitted != identity.tsih):
            raise _Refused(LoginStatus.TARGET_ERROR, f"admit gave TSIH {admitted}")
        response = self._response(req, answers, transit=True, tsih=admitted)
        self.finished = True
        success = LoginSuccess(
            identity=identity,
            tsih=admitted,
            connection=self._negotiation.connection_params(),
            session=self._negotiation.session_params(),
            stat_sn=self._stat_sn,
            exp_cmd_sn=response.exp_cmd_sn,
            max_cmd_sn=response.max_cmd_sn,
        )
        return LoginStep((response,), success)

    def _response(
        self,
        req: LoginRequest,
        answers: Pairs,
        *,
        transit: bool,
        tsih: int | None = None,
        status: LoginStatus = LoginStatus.SUCCESS,
    ) -> LoginResponse:
        data = encode_text(answers)
        if len(data) > LOGIN_SEGMENT:
            # Answers are a few keys each; this takes an initiator that sent thousands of
            # keys we do not know.
            raise _Refused(LoginStatus.OUT_OF_RESOURCES, "login answer too long")
        response = LoginResponse(
            isid=req.isid,
            itt=req.itt,
            tsih=req.tsih if tsih is None else tsih,
            csg=req.csg & 3,
            nsg=req.nsg if transit else 0,
            transit=transit,
            version_max=VERSION,
            version_active=VERSION,
            status_class=status >> 8,
            status_detail=status & 0xFF,
            stat_sn=self._stat_sn,
            exp_cmd_sn=req.cmd_sn,
            max_cmd_sn=max_cmd_sn_for(req.cmd_sn, self._config.command_window),
            data=(data,) if data else (),
        )
        self._stat_sn = serial_add(self._stat_sn, 1)
        return response

    def _failure(self, req: LoginRequest, status: LoginStatus, reason: str) -> LoginStep:
        self.finished = True
        response = self._response(req, [], transit=False, status=status)
        return LoginStep((response,), LoginFailure(status, reason))
