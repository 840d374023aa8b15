"""``sparsegpt users add NAME [--admin]`` / ``token NAME`` / ``remove NAME`` / ``list``.

A token is printed once, alone on the last line; only its sha256 is stored (tokens are 256
random bits, so a fast hash is enough; the API compares hashes in constant time).
"""

from __future__ import annotations

import argparse
import re

from sqlalchemy.exc import IntegrityError

from app import crud, db
from app.config import get_settings
from app.tokens import LOCAL_USER, hash_token, new_token

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")


def _local_token(settings) -> int:
    """A token for the single-user mode's local user: curl and `sparsegpt pull` with it act as the
    person at the browser (the same owner: her browser jobs are hers to cancel from a shell)."""
    token = new_token()
    with db.session_scope(settings.database) as session:
        user = crud.get_or_create_local_user(session, name=LOCAL_USER)
        user.token_hash = hash_token(token)
    print(
        f"new API token for the local user {LOCAL_USER} (an admin, as in the browser; a previous one stops "
        "working; shown once):"
    )
    print(token)
    return 0


def main(args: argparse.Namespace) -> int:
    settings = get_settings()
    db.migrate(settings.database)
    if args.users_command == "add":
        if not _NAME.match(args.name):
            print(f"sparsegpt users: {args.name!r} is not a valid name (letters, digits, _ . @ -; at most 64)")
            return 2
        token = new_token()
        try:
            with db.session_scope(settings.database) as session:
                crud.create_user(session, name=args.name, token_hash=hash_token(token), is_admin=args.admin)
        except IntegrityError:
            print(f"sparsegpt users: a user named {args.name!r} already exists")
            return 1
        print(f"created {'admin ' if args.admin else ''}user {args.name}; its API token (shown once):")
        print(token)
        return 0
    if args.users_command == "token" and args.name is None:
        return _local_token(settings)
    if args.users_command in ("token", "remove"):
        with db.session_scope(settings.database) as session:
            user = crud.get_user_by_name(session, args.name)
            if user is None or user.token_hash.startswith("!"):
                print(f"sparsegpt users: no user named {args.name!r}")
                return 1
            crud.revoke_user_sessions(session, user.id)  # their dashboard sessions end now
            if args.users_command == "remove":
                session.delete(user)  # their jobs stay, without an owner (admins manage them)
                print(f"removed user {args.name}; their token and dashboard sessions no longer work")
                return 0
            token = new_token()
            user.token_hash = hash_token(token)
        print(f"new API token for {args.name} (the old one and its dashboard sessions stop working; shown once):")
        print(token)
        return 0
    with db.session_scope(settings.database) as session:
        for user in crud.list_users(session):
            if user.token_hash.startswith("!"):
                continue  # the single-user mode's built-in admin, without a token
            print(f"{user.id}\t{user.name}\t{'admin' if user.is_admin else 'member'}\t{user.created_at:%Y-%m-%d %H:%M}")
    return 0
