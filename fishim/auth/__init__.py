"""Who is connecting and what they may do.

A package of three concepts, each its own module:

- :mod:`fishim.auth.accounts`: roles, principals, argon2id passwords, user rows, the service secret;
- :mod:`fishim.auth.logins`: the broker's authenticator over the users table, and login limiting;
- :mod:`fishim.auth.acl`: the broker's authorizer, one policy table per role, order membership.

The names other modules use are re-exported here. Importing this package hashes nothing: the
timing-equaliser hash is made on the first login that needs it.
"""

from __future__ import annotations

from fishim.auth.accounts import (
    HUMAN_ROLES,
    RESERVED_PREFIXES,
    Principal,
    Role,
    UserError,
    add_user,
    hash_password,
    new_secret,
    service_credentials,
    service_secret_file,
    verify_password,
)
from fishim.auth.acl import POLICY, OrderAcl
from fishim.auth.logins import LoginBusy, LoginLimiter, StoreAuthenticator

__all__ = [
    "HUMAN_ROLES",
    "POLICY",
    "RESERVED_PREFIXES",
    "LoginBusy",
    "LoginLimiter",
    "OrderAcl",
    "Principal",
    "Role",
    "StoreAuthenticator",
    "UserError",
    "add_user",
    "hash_password",
    "new_secret",
    "service_credentials",
    "service_secret_file",
    "verify_password",
]
