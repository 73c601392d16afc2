# Sourced by the experiment scripts (needs $PY): the test split is read once per reported number.
# test_once FILE EVAL_ARGS...: `maddnet eval EVAL_ARGS --split test` written to FILE (through
# FILE.part, so an interrupted eval leaves nothing), unless FILE already holds a result.
test_once() {
    local file=$1
    shift
    [ -s "$file" ] && return 0
    "$PY" -m maddnet.cli eval "$@" --split test --threads 1 --no-progress --device cpu > "$file.part"
    mv "$file.part" "$file"
}
