# Reads a NoCloud seed's meta-data and user-data (simple YAML: top-level "key: value"
# lines and the "  - " items under ssh_authorized_keys). Writes the keys to the file
# `keys` (when the user-data has the list) and prints "HOSTNAME INSTANCE-ID", each
# "-" when absent.

# A YAML scalar without its quotes: JSON-style double quotes (what Corral writes),
# single quotes, or plain (then a " #" comment ends it).
function scalar(v) {
    sub(/^[ \t]+/, "", v)
    sub(/[ \t\r]+$/, "", v)
    if (v ~ /^".*"$/) {
        v = substr(v, 2, length(v) - 2)
        gsub(/\\"/, "\"", v)
        gsub(/\\\\/, "\\", v)
    } else if (v ~ /^'.*'$/) {
        v = substr(v, 2, length(v) - 2)
        gsub(/''/, "'", v)
    } else {
        sub(/[ \t]+#.*$/, "", v)
    }
    return v
}

function value() { return scalar(substr($0, index($0, ":") + 1)) }

FNR == 1 { meta = FILENAME ~ /meta-data$/; in_keys = 0 }

meta && /^instance-id:/ { iid = value() }
meta && /^local-hostname:/ { meta_host = value() }

!meta {
    if ($0 ~ /^[^ \t#-]/) in_keys = 0  # any top-level key ends the list
    if ($0 ~ /^hostname:/) user_host = value()
    else if ($0 ~ /^ssh_authorized_keys:/) { in_keys = 1; has_keys = 1 }
    else if (in_keys && $0 ~ /^[ \t]*- /) {
        key = $0
        sub(/^[ \t]*- /, "", key)
        key = scalar(key)
        if (key != "") keys_text = keys_text key "\n"
    }
}

END {
    # cloud-init's order: user-data's hostname, then meta-data's local-hostname.
    host = user_host != "" ? user_host : meta_host
    # The readiness line is space-separated key=value: keep each value one token.
    gsub(/[^A-Za-z0-9.-]/, "", host)
    gsub(/[^!-~]/, "", iid)
    if (has_keys) printf "%s", keys_text > keys
    print (host != "" ? substr(host, 1, 63) : "-"), (iid != "" ? iid : "-")
}
