"""The opcode scan every untrusted pickle passes before a real unpickler sees it.

A pickle is a program for a stack machine, and the C unpickler (``.metadata``) and torch's
weights-only unpickler (object records) run it with no limit on time, memory or what
it touches. Both resolve names only through an allowlist, but that is not enough:

- **shared state.** ``BUILD``, ``SETITEM(S)``, ``APPEND(S)`` and ``ADDITEMS`` change the
  object on top of the stack. If that object is not one the pickle just built -- an enum
  member an allowlisted call returned, a class, a layout -- the change is process-wide
  (``WriteItemType.TENSOR`` renamed for every later save). So each value records *which
  callable made it*, and those opcodes may only target containers this pickle built with
  its own opcodes or objects of a constructor that always builds a new one.
- **names outside the allowlist.** ``EXT1/2/4`` resolve a ``copyreg`` extension code
  without ``find_class`` (and the C unpickler caches the result process-wide): refused.
  ``STACK_GLOBAL`` takes its names from two string values, so strings carry where they
  are in the file and every name the scan resolves is handed to the unpickler, which
  checks it meets exactly those names in that order.
- **time.** Inserting keys whose hashes collide into a dict or set is quadratic, inside
  the unpickler, before any check. ``str``/``bytes`` hashes are keyed per process, but an
  attacker computes ``int``/``float``/``complex``/``tuple``/``torch.Size`` hashes at will.
  With ``string_keys`` (``.metadata``) every dict key and set member must be a string or a
  DCP ``MetadataIndex`` (which the unpickler resolves to a subclass with a keyed hash).
  Otherwise (object records: user data, int-keyed dicts are normal) every value carries a
  *model* -- a small Python value with the same hash as the real one, or a placeholder
  where the real hash is unpredictable (identity-hashed objects) -- and a dict or set may
  hold at most :data:`MAX_EQUAL_HASHES` keys per hash value. Hashing cost itself (a key
  that shares sub-tuples hashes exponentially many elements) is charged to the budget.
- **crashes and memory.** Containers nested deeper than :data:`MAX_NESTING` (hashing them
  recurses in C), length fields longer than the bytes that remain, memo indexes beyond the
  file, integers outside 64 bits where ``int_limit`` is set, and calls that would copy
  more elements than the file could describe are refused.

Linear in the pickle's size: one pass, constant work per opcode except the elements an
opcode itself consumes, and hash models bounded by :data:`_MAX_MODEL_WEIGHT`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dcp_datastates.errors import CorruptCheckpointError, UnsafeCheckpointError

#: Deepest nesting of containers a pickle may build (real DCP metadata stays below 15).
MAX_NESTING = 100
#: Elements the unpickler may copy in calls (``tuple(x)``, ``BUILD``), and hash, per byte of pickle.
_COPY_BUDGET_PER_BYTE = 8
#: Keys of one dict or set that may share one hash value (honest data: 1, rarely 2).
MAX_EQUAL_HASHES = 16
#: Keys of one dict or set whose hashes the scan cannot model (classes with their own ``__hash__``).
MAX_OPAQUE_KEYS = 64
#: Heaviest value (elements hashed, repeats counted) whose hash the scan models itself.
_MAX_MODEL_WEIGHT = 256
_WEIGHT_CAP = 1 << 62

TRUST_HINT = (
    "If you trust where this checkpoint came from, load it with DataStatesReader(path, trust_checkpoint=True) "
    "(CLI: --trust)."
)

# -- what a value on the scan's stack is ----------------------------------------------------------
#: kinds; only LIST, DICT, SET (built by opcodes), FRESH and INDEX objects may be changed
LEAF, STR, TUPLE, LIST, DICT, SET, FRESH, INDEX, SHARED, GLOBAL = range(10)
_KIND_NAMES = ["number", "string", "tuple", "list", "dict", "set", "new object", "MetadataIndex",
               "object a call returned", "global"]
# cell fields: a cell is a list (mutable containers, shared through the memo as the objects are)
# or a tuple (immutable values); in .metadata (no models) the most frequent cells have only the first five
DEPTH, LENGTH, INNER, KIND, AUX, MODEL, WEIGHT = range(7)
# AUX: TUPLE: its element cells when it has at most one (what a call's argument checks need), or two
# in object mode (the (key, value) pairs of OrderedDict([...])), else _MANY; LIST: its element cells
# where a set()/Counter() call is about to take it, else None (kept
# only there: a list of a million numbers must not cost a million cells); DICT, SET and FRESH: hash
# counts (object mode); GLOBAL: its Callee; SHARED: what made it; STR: opcode position (STACK_GLOBAL)


class _Ident:
    """Model of a value whose hash is unpredictable (identity-hashed, or keyed like ``str``)."""

    __slots__ = ()


#: models that are no value: unhashable (the insertion fails anyway), or hashable in a way the scan cannot model
_UNHASHABLE, _OPAQUE = object(), object()
UNHASHABLE = _UNHASHABLE
H_ID, H_OPAQUE, H_NONE = range(3)
ARGS_ANY, ARGS_ELEMENTS, ARGS_MAPPING = range(3)


@dataclass(frozen=True)
class Callee:
    """What a resolved name is, as far as the scan needs to know."""

    name: str
    call: int = SHARED  # kind of what calling it returns (REDUCE, OBJ, INST)
    new: int = SHARED  # kind of what NEWOBJ / NEWOBJ_EX of it returns
    args: int = ARGS_ANY  # ARGS_ELEMENTS: hashes its one argument's elements; ARGS_MAPPING: () or one dict only
    hashes: int = H_OPAQUE  # how its results hash, where ``model`` does not say
    value: Any = _OPAQUE  # model of the global itself
    model: Callable[..., Any] | None = None  # object mode: model of a call's result from the arguments' models


@dataclass(frozen=True)
class ScanPolicy:
    """How strict the scan is and what names mean: one for ``.metadata``, one for object records."""

    resolve: Callable[[str, str], Callee]  # raises UnsafeCheckpointError for a refused name
    string_keys: bool  # dict keys and set members must be strings or MetadataIndex
    int_limit: bool  # integers must fit in 64 bits


def _corrupt(source: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{source} is damaged: {what}. Restore it from a copy or load another checkpoint.")


# Opcode argument shapes (pickle protocols 0-5).
_FIXED = {ord(c): n for c, n in [("J", 4), ("K", 1), ("M", 2), ("h", 1), ("j", 4), ("q", 1), ("r", 4),
                                 ("\x82", 1), ("\x83", 2), ("\x84", 4), ("\x80", 1), ("\x95", 8), ("G", 8)]}
_COUNTED = {ord(c): (n, signed) for c, n, signed in [
    ("U", 1, False), ("C", 1, False), ("\x8c", 1, False), ("\x8a", 1, False),
    ("T", 4, True), ("B", 4, False), ("X", 4, False), ("\x8b", 4, True),
    ("\x8e", 8, False), ("\x8d", 8, False), ("\x96", 8, False)]}
_LINES = {ord(c): n for c, n in [("I", 1), ("L", 1), ("S", 1), ("V", 1), ("F", 1), ("g", 1), ("p", 1), ("P", 1),
                                 ("c", 2), ("i", 2)]}
_ARG_KIND = [1 if op in _FIXED else 2 if op in _COUNTED else 3 if op in _LINES else 0 for op in range(256)]
_UNICODE_OPS = {0x8C, 0x58, 0x8D}  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8: what STACK_GLOBAL may take
_STRING_OPS = {ord(c) for c in "UCTBX\x8c\x8d\x8e"}
_TUPLE_N = {0x85: 1, 0x86: 2, 0x87: 3}
_MUTATORS = {0x61: "appends to", 0x65: "appends to", 0x73: "adds items to", 0x75: "adds items to",
             0x90: "adds items to", 0x62: "sets the state of"}
_MUTABLE_BY = {0x61: (LIST, FRESH), 0x65: (LIST, FRESH), 0x73: (DICT, FRESH), 0x75: (DICT, FRESH),
               0x90: (SET, FRESH), 0x62: (FRESH, INDEX, LIST, DICT, SET)}
_NONE = (0, 0, 0, LEAF, None, None, 1)
_TRUE = (0, 0, 0, LEAF, None, True, 1)
_FALSE = (0, 0, 0, LEAF, None, False, 1)
_NUM = (0, 0, 0, LEAF, None, _OPAQUE, 1)  # a number in .metadata (never a key there: no model needed)
_EMPTY_TUPLE = (1, 0, 0, TUPLE, (), (), 1)
_MANY = (None, None)  # AUX of a tuple of more than one element
_SMALL_INTS = {v: (0, 0, 0, LEAF, None, v, 1) for v in range(-256, 1025)}
_UNKNOWN = (0, 0, 0, SHARED, "a value the unpickler cannot make", _UNHASHABLE, 1)


def _tuple_model(items: list) -> tuple[Any, int]:
    """Model and weight of a tuple (or frozenset) of ``items``."""
    weight = 1
    models = []
    opaque = False
    for c in items:
        weight += c[WEIGHT]
        m = c[MODEL]
        if m is _UNHASHABLE:
            return _UNHASHABLE, min(weight, _WEIGHT_CAP)
        opaque = opaque or m is _OPAQUE
        models.append(m)
    weight = min(weight, _WEIGHT_CAP)
    if opaque or weight > _MAX_MODEL_WEIGHT:
        return _OPAQUE, weight
    return tuple(models), weight


def _describe(cell: Any) -> str:
    kind = cell[KIND]
    if kind == GLOBAL:
        return f"the global {cell[AUX].name} itself"
    if kind == SHARED:
        aux = cell[AUX]
        return f"the object {aux.name}(...) returned (it may be shared)" if isinstance(aux, Callee) else aux
    return f"a {_KIND_NAMES[kind]}"


def scan_pickle(data: bytes, source: str, policy: ScanPolicy) -> list[tuple[str, str]]:
    """Refuse a pickle that could crash, stall, exhaust memory, or change shared objects (module docstring).

    Returns every ``(module, name)`` it resolves, in order: the unpickler must meet exactly these.
    """
    n = len(data)
    budget = _COPY_BUDGET_PER_BYTE * n + 4096
    string_keys = policy.string_keys
    modelling = not string_keys
    int_limit = policy.int_limit
    resolve = policy.resolve
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}
    names: list[tuple[str, str]] = []
    i = pos = 0

    def fail(what: str) -> CorruptCheckpointError:
        return _corrupt(source, f"{what} (byte {pos})")

    def unsafe(what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{source} {what} (byte {pos}); refusing to unpickle it. {TRUST_HINT}")

    def deep(depth: int) -> int:
        if depth > MAX_NESTING:
            raise fail(f"it nests containers more than {MAX_NESTING} levels deep")
        return depth

    def pop_mark() -> list[Any]:
        nonlocal stack
        if not marks:
            raise fail("its pickle is malformed: no mark to pop to")
        items, stack = stack, marks.pop()
        return items

    def check_int(value: int) -> None:
        if int_limit and not -(2**63) <= value < 2**63:
            raise fail("an integer does not fit in 64 bits")

    def number(value: Any) -> Any:
        if not modelling:
            return _NUM
        if type(value) is int:
            cell = _SMALL_INTS.get(value)
            return cell if cell is not None else (0, 0, 0, LEAF, None, value, 1 + (value.bit_length() >> 9))
        return (0, 0, 0, LEAF, None, value, 1)

    def string_at(at: int) -> str:
        """The text of the unicode opcode at ``at``, decoded as the unpickler decodes it."""
        op = data[at]
        width = 1 if op == 0x8C else 4 if op == 0x58 else 8
        length = int.from_bytes(data[at + 1 : at + 1 + width], "little")
        return data[at + 1 + width : at + 1 + width + length].decode("utf-8", "surrogatepass")

    def checked_call_below() -> bool:
        """Is the value below a new list a set(...) / Counter(...)-like global, which will hash its elements?"""
        return bool(stack) and stack[-1][KIND] == GLOBAL and stack[-1][AUX].args != ARGS_ANY

    def named(module: str, name: str) -> tuple:
        names.append((module, name))
        callee = resolve(module, name)
        return (0, 0, 0, GLOBAL, callee, callee.value, 1)

    def add_keys(container: Any, keys: list[Any]) -> None:
        """``keys`` go into ``container``'s hash table: strings only (``.metadata``), or few per hash value."""
        nonlocal budget
        if string_keys:
            for k in keys:
                kind = k[KIND]
                if kind != STR and kind != INDEX:
                    raise unsafe(
                        f"has a {_KIND_NAMES[kind]} as a dict key or set member; safe loading admits only strings and "
                        "DCP's MetadataIndex there (numbers and tuples can be chosen to collide in a hash table and "
                        "stall loading)")
            return
        counts = container[AUX] if type(container) is list and container[KIND] in (DICT, SET, FRESH) else None
        if counts is None:
            counts = {}
            if type(container) is list and container[KIND] in (DICT, SET, FRESH):
                container[AUX] = counts
        for k in keys:
            budget -= k[WEIGHT]  # what hashing it costs the unpickler, even when it then fails
            m = k[MODEL]
            if m is _UNHASHABLE or type(m) is _Ident:
                continue
            bucket = m if m is _OPAQUE else hash(m)
            count = counts.get(bucket, 0) + 1
            counts[bucket] = count
            if m is _OPAQUE:
                if count > MAX_OPAQUE_KEYS:
                    raise unsafe(f"has more than {MAX_OPAQUE_KEYS} keys in one dict or set whose hashes safe loading "
                                 "cannot bound (objects with their own __hash__)")
            elif count > MAX_EQUAL_HASHES:
                raise fail(f"{count} keys of one dict or set share one hash value (a hash-flooding attempt: "
                           "inserting them would take quadratic time)")
        if budget < 0:
            raise fail(f"hashing its keys would cost more than its {n} bytes describe")

    def elements(cell: Any, what: str) -> list[Any] | None:
        """The element cells a set(...) / Counter(...) call hashes, None when they are hashed already."""
        kind = cell[KIND]
        if kind in (DICT, SET, STR):  # dict and set keys were checked on the way in; characters hash keyed
            return None
        if kind in (LIST, TUPLE) and cell[AUX] is not None and cell[AUX] is not _MANY:
            return list(cell[AUX])
        raise fail(f"it builds {what} from {_describe(cell)}, whose elements the scan cannot check")

    def pair_keys(pairs: list[Any], name: str) -> list[Any]:
        """The key cells of a mapping built from ``(key, value)`` pairs; refused unless every element is one."""
        keys = []
        for pair in pairs:
            aux = pair[AUX] if pair[KIND] == TUPLE else None
            if aux is None or aux is _MANY or len(aux) != 2:
                raise fail(f"it builds a mapping ({name}) from {_describe(pair)}, not from (key, value) pairs")
            keys.append(aux[0])
        return keys

    def call(func: Any, args: Any, new: bool) -> list[Any]:
        """The cell of what ``func(*args)`` (REDUCE, OBJ, INST) or ``func.__new__(func, *args)`` returns."""
        nonlocal budget
        budget -= args[INNER]
        depth = deep(max(func[DEPTH], args[DEPTH]) + 1)
        if func[KIND] != GLOBAL:
            return [depth, 0, 0, SHARED, f"the result of calling {_describe(func)}", _OPAQUE, 1]
        callee: Callee = func[AUX]
        kind = callee.new if new else callee.call
        cell = [depth, 0, 0, kind, None, _OPAQUE, 1]
        if kind == SHARED:
            cell[AUX] = callee
        items = args[AUX] if args[KIND] == TUPLE else None
        keys = None
        if callee.args != ARGS_ANY:
            if items is None or len(items) > 1:
                raise fail(f"it calls {callee.name} with arguments the scan cannot check")
            if items:
                what = "a set" if callee.args == ARGS_ELEMENTS else "a mapping"
                keys = elements(items[0], what)
                if keys is not None:
                    if callee.args == ARGS_MAPPING and callee.name != "collections.Counter":
                        keys = pair_keys(keys, callee.name)  # OrderedDict([(k, v), ...]): the pairs' first items
                    add_keys(cell, keys)
                elif modelling and items[0][KIND] == DICT and kind in (DICT, FRESH) and items[0][AUX]:
                    cell[AUX] = dict(items[0][AUX])  # the copied keys stay in the new mapping's table
        if modelling:
            if callee.model is not None:  # an immutable value (complex, torch.Size, frozenset, device): model it
                if callee.args == ARGS_ELEMENTS:  # frozenset(elements)
                    model, weight = _tuple_model(keys) if keys is not None else ((), 1) if not items else (_OPAQUE, 1)
                else:
                    model, weight = args[MODEL], args[WEIGHT]
                cell[WEIGHT] = weight
                try:
                    if type(model) is not tuple:
                        raise TypeError
                    cell[MODEL] = callee.model(model) if callee.args == ARGS_ELEMENTS else callee.model(*model)
                except Exception:  # noqa: BLE001 - arguments the scan cannot model (or the real call refuses)
                    cell[MODEL] = _OPAQUE
            elif kind in (LIST, DICT, SET) or callee.hashes == H_NONE:
                cell[MODEL] = _UNHASHABLE
            elif kind in (STR, INDEX) or callee.hashes == H_ID:
                cell[MODEL] = _Ident()
        return cell

    def mutate(op: int, items: list[Any]) -> None:
        nonlocal budget
        target = stack[-1]
        if target[KIND] not in _MUTABLE_BY[op]:
            raise fail(f"it {_MUTATORS[op]} an object it did not create ({_describe(target)})")
        target[DEPTH] = deep(max([target[DEPTH]] + [c[DEPTH] + 1 for c in items]))
        if op == 0x62:  # BUILD
            state = items[0]
            budget -= state[LENGTH] + state[INNER]
            return
        target[LENGTH] += len(items)
        target[INNER] += sum(c[LENGTH] for c in items)
        if op == 0x61 or op == 0x65:
            if target[KIND] == LIST and target[AUX] is not None:
                target[AUX].extend(items)
        elif op == 0x90:
            add_keys(target, items)
        else:
            add_keys(target, items[0::2])

    try:
        while True:
            if i >= n:
                raise fail("its pickle ends before its STOP opcode (truncated?)")
            op = data[i]
            # the four most frequent opcodes of DCP metadata, without the general machinery
            if op == 0x94:  # MEMOIZE
                memo[len(memo)] = stack[-1]
                i += 1
                continue
            if op == 0x68:  # BINGET
                stack.append(memo[data[i + 1]])
                i += 2
                continue
            if op == 0x8C:  # SHORT_BINUNICODE
                at = i
                i += 2 + data[i + 1]
                if i > n:
                    pos = i
                    raise fail("its pickle is truncated inside a string")
                # .metadata: no model (strings are no key problem there), so five fields, the memo holds many
                stack.append((0, 0, 0, STR, at, data[at + 2 : i].decode("utf-8", "surrogatepass"), 1) if modelling
                             else (0, 0, 0, STR, at))
                continue
            if op == 0x29:  # EMPTY_TUPLE
                stack.append(_EMPTY_TUPLE)
                i += 1
                continue
            if op == 0x6A and i + 5 <= n:  # LONG_BINGET
                stack.append(memo[int.from_bytes(data[i + 1 : i + 5], "little")])
                i += 5
                continue
            if op == 0x28:  # MARK
                marks.append(stack)
                stack = []
                i += 1
                continue
            if op == 0x7D:  # EMPTY_DICT
                stack.append([1, 0, 0, DICT, None, _UNHASHABLE, 1] if modelling else [1, 0, 0, DICT, None])
                i += 1
                continue
            if op == 0x4B and not modelling and i + 2 <= n:  # BININT1
                stack.append(_NUM)
                i += 2
                continue
            pos = i
            if not modelling:  # .metadata: the calls, tuples and mutations of every record, inline
                if op == 0x85 and stack:  # TUPLE1
                    c = stack[-1]
                    depth = c[DEPTH] + 1
                    if depth > MAX_NESTING:
                        deep(depth)
                    stack[-1] = (depth, 1, c[LENGTH], TUPLE, (c,))
                    i += 1
                    continue
                if op == 0x86 and len(stack) >= 2:  # TUPLE2
                    b = stack.pop()
                    a = stack[-1]
                    depth = (a[DEPTH] if a[DEPTH] > b[DEPTH] else b[DEPTH]) + 1
                    if depth > MAX_NESTING:
                        deep(depth)
                    stack[-1] = (depth, 2, a[LENGTH] + b[LENGTH], TUPLE, (a, b) if modelling else _MANY)
                    i += 1
                    continue
                if op == 0x4E or op == 0x89 or op == 0x88:  # NONE, NEWFALSE, NEWTRUE
                    stack.append(_NONE if op == 0x4E else _FALSE if op == 0x89 else _TRUE)
                    i += 1
                    continue
                if op == 0x81 or op == 0x52:  # NEWOBJ, REDUCE
                    args = stack.pop()
                    func = stack.pop()
                    callee = func[AUX] if func[KIND] == GLOBAL else None
                    if callee is not None and callee.args == ARGS_ANY:
                        budget -= args[INNER]
                        depth = max(func[DEPTH], args[DEPTH]) + 1
                        if depth > MAX_NESTING:
                            deep(depth)
                        stack.append([depth, 0, 0, callee.new if op == 0x81 else callee.call, callee])
                        if budget < 0:
                            raise fail(f"it asks the unpickler to copy more elements than its {n} bytes describe")
                    else:
                        stack.append(call(func, args, new=op == 0x81))
                    i += 1
                    continue
                if op == 0x62:  # BUILD
                    target = stack[-2]
                    if target[KIND] == FRESH or target[KIND] == INDEX:
                        state = stack.pop()
                        budget -= state[LENGTH] + state[INNER]
                        if state[DEPTH] >= target[DEPTH]:
                            target[DEPTH] = deep(state[DEPTH] + 1)
                        if budget < 0:
                            raise fail(f"it asks the unpickler to copy more elements than its {n} bytes describe")
                        i += 1
                        continue
                elif op == 0x75 and marks:  # SETITEMS
                    items = stack
                    target = marks[-1][-1]
                    if target[KIND] == DICT or target[KIND] == FRESH:
                        for j in range(0, len(items), 2):
                            kind = items[j][KIND]
                            if kind != STR and kind != INDEX:
                                add_keys(target, items[0::2])  # raises, naming the key's kind
                        stack = marks.pop()
                        if items:
                            depth = 1 + max([c[DEPTH] for c in items])
                            if depth > target[DEPTH]:
                                target[DEPTH] = deep(depth)
                            target[LENGTH] += len(items)
                            target[INNER] += sum([c[LENGTH] for c in items])
                        i += 1
                        continue
            i += 1
            kind = _ARG_KIND[op]
            if kind == 1:
                width = _FIXED[op]
                if i + width > n:
                    raise fail("its pickle is truncated inside an opcode")
                if width == 1:
                    arg = data[i]
                else:
                    arg = int.from_bytes(data[i : i + width], "little", signed=op == 0x4A or op == 0x84)
                i += width
            elif kind == 2:
                width, signed = _COUNTED[op]
                if i + width > n:
                    raise fail("its pickle is truncated inside a length field")
                length = data[i] if width == 1 else int.from_bytes(data[i : i + width], "little", signed=signed)
                i += width
                if length < 0 or length > n - i:
                    raise fail(f"a length field claims {length} bytes but only {n - i} remain (truncated?)")
                start = i
                i += length
            elif kind == 3:
                start = i
                for _ in range(_LINES[op]):
                    end = data.find(b"\n", i)
                    if end < 0:
                        raise fail("its pickle is truncated inside a text argument")
                    i = end + 1
                if op in (0x49, 0x4C, 0x67, 0x70):  # INT, LONG, GET, PUT
                    text = data[start : i - 1].rstrip(b"L")
                    if text in (b"00", b"01"):
                        text = text[1:]
                    arg = int(text) if len(text) < 40 or not int_limit else 2**64
                    if op in (0x49, 0x4C):
                        check_int(arg)

            if op in _TUPLE_N:
                k = _TUPLE_N[op]
                if len(stack) < k:
                    raise fail("its pickle is malformed: stack underflow")
                items = stack[-k:]
                del stack[-k:]
                model, weight = _tuple_model(items) if modelling else (_OPAQUE, 1)
                stack.append((deep(1 + max(c[DEPTH] for c in items)), k, sum(c[LENGTH] for c in items), TUPLE,
                              items if k == 1 or (k == 2 and modelling) else _MANY, model, weight))
            elif op in _STRING_OPS:  # counted strings and bytes
                stack.append((0, 0, 0, STR, pos if op in _UNICODE_OPS else None,
                              (data[start:i].decode("utf-8", "surrogatepass") if op in _UNICODE_OPS else data[start:i])
                              if modelling else None, 1))
            elif op == 0x4B or op == 0x4A or op == 0x4D:  # BININT1, BININT, BININT2
                stack.append(number(arg) if modelling else _NUM)
            elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
                value = int.from_bytes(data[start:i], "little", signed=True) if length <= 9 or not int_limit else 2**64
                check_int(value)
                stack.append(number(value))
            elif op == 0x49 or op == 0x4C:  # INT, LONG
                stack.append(number(arg))
            elif op == 0x4E:  # NONE
                stack.append(_NONE)
            elif op == 0x88 or op == 0x89:  # NEWTRUE, NEWFALSE
                stack.append(_TRUE if op == 0x88 else _FALSE)
            elif op == 0x47:  # BINFLOAT
                stack.append(number(struct.unpack(">d", data[i - 8 : i])[0]) if modelling else _NUM)
            elif op == 0x46:  # FLOAT
                stack.append(number(float(data[start : i - 1])) if modelling else _NUM)
            elif op == 0x53 or op == 0x56:  # STRING, UNICODE (text)
                stack.append((0, 0, 0, STR, None, data[start : i - 1], 1))
            elif op == 0x96:  # BYTEARRAY8: a new mutable object
                stack.append([0, 0, 0, FRESH, None, _UNHASHABLE, 1])
            elif op == 0x68 or op == 0x6A or op == 0x67:  # BINGET, LONG_BINGET, GET
                stack.append(memo[arg])
            elif op == 0x71 or op == 0x72 or op == 0x70:  # BINPUT, LONG_BINPUT, PUT
                if not 0 <= arg <= i:
                    raise fail(f"memo index {arg} is beyond anything the file could store")
                memo[arg] = stack[-1]
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([1, 0, 0, LIST, [] if checked_call_below() else None, _UNHASHABLE, 1])
            elif op == 0x7D:  # EMPTY_DICT
                stack.append([1, 0, 0, DICT, None, _UNHASHABLE, 1])
            elif op == 0x8F:  # EMPTY_SET
                stack.append([1, 0, 0, SET, None, _UNHASHABLE, 1])
            elif op == 0x28:  # MARK
                marks.append(stack)
                stack = []
            elif op == 0x74:  # TUPLE
                items = pop_mark()
                model, weight = _tuple_model(items) if modelling else (_OPAQUE, 1)
                stack.append((deep(1 + max((c[DEPTH] for c in items), default=0)), len(items),
                              sum(c[LENGTH] for c in items), TUPLE,
                              items if len(items) <= 1 or (len(items) == 2 and modelling) else _MANY, model, weight))
            elif op == 0x6C:  # LIST
                items = pop_mark()
                stack.append([deep(1 + max((c[DEPTH] for c in items), default=0)), len(items),
                              sum(c[LENGTH] for c in items), LIST, items if checked_call_below() else None, _UNHASHABLE, 1])
            elif op == 0x64:  # DICT
                items = pop_mark()
                cell = [deep(1 + max((c[DEPTH] for c in items), default=0)), len(items), sum(c[LENGTH] for c in items),
                        DICT, None, _UNHASHABLE, 1]
                add_keys(cell, items[0::2])
                stack.append(cell)
            elif op == 0x91:  # FROZENSET
                items = pop_mark()
                add_keys([0, 0, 0, SET, None, None, 1], items)
                model, weight = _tuple_model(items) if modelling else (_OPAQUE, 1)
                if type(model) is tuple:
                    model = frozenset(model)
                stack.append((deep(1 + max((c[DEPTH] for c in items), default=0)), len(items),
                              sum(c[LENGTH] for c in items), TUPLE, None, model, weight))
            elif op == 0x61:  # APPEND
                mutate(op, [stack.pop()])
            elif op == 0x73:  # SETITEM
                value = stack.pop()
                mutate(op, [stack.pop(), value])
            elif op in (0x65, 0x75, 0x90):  # APPENDS, SETITEMS, ADDITEMS
                mutate(op, pop_mark())
            elif op == 0x62:  # BUILD
                mutate(op, [stack.pop()])
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                stack.append(call(stack.pop(), args, new=False))
            elif op == 0x81:  # NEWOBJ
                args = stack.pop()
                stack.append(call(stack.pop(), args, new=True))
            elif op == 0x92:  # NEWOBJ_EX
                kwargs, args = stack.pop(), stack.pop()
                budget -= kwargs[LENGTH] + kwargs[INNER]
                cell = call(stack.pop(), args, new=True)
                cell[DEPTH] = deep(max(cell[DEPTH], kwargs[DEPTH] + 1))
                stack.append(cell)
            elif op == 0x6F:  # OBJ: MARK cls *args OBJ
                items = pop_mark()
                model, weight = _tuple_model(items[1:]) if modelling else (_OPAQUE, 1)
                args = (max((c[DEPTH] for c in items[1:]), default=0), 0, sum(c[LENGTH] for c in items[1:]), TUPLE,
                        items[1:], model, weight)
                stack.append(call(items[0], args, new=False))
            elif op == 0x69:  # INST: MARK *args INST module name
                module, name = data[start:i].split(b"\n")[:2]
                func = named(module.decode("utf-8"), name.decode("utf-8"))
                items = pop_mark()
                model, weight = _tuple_model(items) if modelling else (_OPAQUE, 1)
                args = (max((c[DEPTH] for c in items), default=0), 0, sum(c[LENGTH] for c in items), TUPLE, items,
                        model, weight)
                stack.append(call(func, args, new=False))
            elif op == 0x63:  # GLOBAL
                module, name = data[start:i].split(b"\n")[:2]
                stack.append(named(module.decode("utf-8"), name.decode("utf-8")))
            elif op == 0x93:  # STACK_GLOBAL
                name_cell, module_cell = stack.pop(), stack.pop()
                if module_cell[KIND] != STR or name_cell[KIND] != STR or module_cell[AUX] is None or name_cell[AUX] is None:
                    raise fail("its STACK_GLOBAL takes its name from something other than two strings")
                stack.append(named(string_at(module_cell[AUX]), string_at(name_cell[AUX])))
            elif op in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4
                raise unsafe(f"refers to copyreg extension code {arg}, which resolves a name without the allowlist")
            elif op == 0x50 or op == 0x51:  # PERSID, BINPERSID: a storage (object records), refused in .metadata
                if op == 0x51:
                    stack.pop()
                stack.append((0, 0, 0, SHARED, "a persistent object", _Ident() if modelling else _OPAQUE, 1))
            elif op == 0x97:  # NEXT_BUFFER: fails without out-of-band buffers
                stack.append(_UNKNOWN)
            elif op == 0x30:  # POP
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                stack.append(stack[-1])
            elif op in (0x80, 0x95, 0x98):  # PROTO, FRAME, READONLY_BUFFER
                pass
            elif op == 0x2E:  # STOP
                stack.pop()
                return names
            else:
                raise fail(f"its pickle holds an unknown opcode 0x{op:02x}")
            if budget < 0:
                raise fail(f"it asks the unpickler to copy more elements than its {n} bytes describe")
    except (CorruptCheckpointError, UnsafeCheckpointError):
        raise
    except (IndexError, KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise fail(f"its pickle is malformed ({type(exc).__name__})") from exc
