#!/usr/bin/env bash
# Builds hapair's container images FROM SCRATCH with buildah: no base image is pulled, so
# nothing but Debian's packages (buildah, skopeo) is needed. Each image holds one binary, the
# shared libraries it links (as `ldd` reports them) and the dynamic loader, minimal
# /etc/passwd, /etc/group and /etc/nsswitch.conf, an empty /tmp, the Debian copyright files
# of the packages the libraries come from, and an SPDX SBOM at /usr/share/doc/hapair/sbom.spdx.json.
# Runs as UID/GID 65532; OCI labels say what, which version, which commit and which build
# profile. The names and tags are the chart's defaults (charts/hapair/values.yaml and the
# chart's appVersion), so `helm install` finds the images once they are pushed.
#
# Usage: scripts/build-image.sh [--bin-dir DIR] [--profile debug|release] [--output DIR]
#                               [--image operator|agent] [--push REGISTRY/PREFIX]
# Output: DIR/hapair-operator-VERSION.tar and DIR/hapair-agent-VERSION.tar (oci-archive),
# with the SBOM of each beside it (DIR/hapair-operator-VERSION.spdx.json, ...).
# Needs root for apt-get when buildah or skopeo is missing; buildah itself also runs rootless.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

usage() {
    cat <<'EOF'
Usage: scripts/build-image.sh [options]

Builds the hapair-operator and hapair-agent container images (OCI, from scratch) from
already built binaries, as oci-archive files.

  --bin-dir DIR        where the binaries are (default: $HAPAIR_IMAGE_BIN_DIR or target/release)
  --profile P          debug or release: recorded in the dev.hapair.build.profile label
                       (default: the name of --bin-dir when it is "debug" or "release")
  --output DIR         where the archives and SBOMs go (default: $HAPAIR_IMAGE_OUTPUT or
                       target/images)
  --image NAME         build only this image: operator or agent (repeatable; default both)
  --push REG/PREFIX    afterwards copy each image to docker://REG/PREFIX/<name>:<tag> with
                       skopeo (log in first with `skopeo login REG`; extra skopeo copy flags,
                       e.g. --dest-tls-verify=false, in $HAPAIR_PUSH_FLAGS)
  -h, --help           this text

SOURCE_DATE_EPOCH, when set, is the creation time of the images and of every file in
them (reproducible builds); otherwise it is now.
EOF
}

die() {
    echo "build-image: $*" >&2
    exit 1
}

bin_dir="${HAPAIR_IMAGE_BIN_DIR:-target/release}"
out_dir="${HAPAIR_IMAGE_OUTPUT:-target/images}"
profile=""
push=""
only=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir | --profile | --output | --image | --push)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"
            case "$1" in
                --bin-dir) bin_dir="$2" ;;
                --profile) profile="$2" ;;
                --output) out_dir="$2" ;;
                --image) only+=("$2") ;;
                --push) push="${2%/}" ;;
            esac
            shift 2
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

images=(operator agent)
if [ ${#only[@]} -gt 0 ]; then
    for name in "${only[@]}"; do
        case "$name" in operator | agent) ;; *) die "--image must be operator or agent, not $name" ;; esac
    done
    images=("${only[@]}")
fi

[ -d "$bin_dir" ] || die "no binaries directory $bin_dir (build first: cargo build --release --locked -p hapair-operator -p hapair-agent)"
if [ -z "$profile" ]; then
    case "$(basename "$bin_dir")" in
        debug | release) profile="$(basename "$bin_dir")" ;;
        *) die "cannot tell whether $bin_dir holds a debug or a release build: pass --profile debug or --profile release" ;;
    esac
fi
case "$profile" in debug | release) ;; *) die "--profile must be debug or release, not $profile" ;; esac

# The version: the workspace's, which must be the chart's appVersion, since the chart's
# default tag is its appVersion.
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)"
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/hapair/Chart.yaml)"
[ "$app_version" = "$version" ] || die "charts/hapair/Chart.yaml appVersion is '$app_version' but the workspace version is '$version': the chart's default tag would name an image this build does not make"
license="$(sed -n '/^\[workspace.package\]/,/^\[/s/^license = "\(.*\)"$/\1/p' Cargo.toml)"
source_url="$(sed -n '/^\[workspace.package\]/,/^\[/s/^repository = "\(.*\)"$/\1/p' Cargo.toml)"

# The chart's default image of a component (operator, agent): "repository tag", the tag
# defaulting to the appVersion like the chart's hapair.image helper does.
chart_image() {
    awk -v top="$1:" '
        /^[^ #]/ { t = $1; inimage = 0 }
        t == top && /^  image:/ { inimage = 1; next }
        t == top && inimage && /^  [^ ]/ { inimage = 0 }
        t == top && inimage && /^    repository:/ { repo = $2 }
        t == top && inimage && /^    tag:/ { tag = $2 }
        END { gsub(/"/, "", repo); gsub(/"/, "", tag); print repo, tag }
    ' charts/hapair/values.yaml
}

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
tree_state=clean
if [ "$revision" = unknown ]; then
    tree_state=unknown
elif [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    tree_state=modified
fi
epoch="${SOURCE_DATE_EPOCH:-$(date +%s)}"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
arch="$(dpkg --print-architecture)"

tools=(buildah)
[ -z "$push" ] || tools+=(skopeo)
command -v python3 >/dev/null || tools+=(python3)
ensure_debian_packages "${tools[@]}"

mkdir -p "$out_dir"
work="$(mktemp -d -t hapair-build-image.XXXXXX)"
# A private image store: the build leaves nothing in the machine's containers-storage.
# vfs needs neither overlayfs nor fuse, and these images are one small layer.
buildah_cmd=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
container=""
cleanup() {
    if [ -n "$container" ]; then
        "${buildah_cmd[@]}" rm "$container" >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The Debian package that installed $1, tried under its own name, its resolved name and its
# /usr-merged alias (dpkg knows each file by the path its package ships it under).
debian_owner() {
    local path="$1" candidate real owner
    real="$(readlink -f "$path")"
    for candidate in "$path" "$real" "/usr$path" "${real#/usr}"; do
        owner="$(dpkg -S "$candidate" 2>/dev/null | sed -n '1s/^\([^:,]*\)\(:[^:]*\)\{0,1\}: .*$/\1/p')" || true
        if [ -n "$owner" ]; then
            echo "$owner"
            return 0
        fi
    done
    return 1
}

# Copies $1 (a binary on this host) with every library it links and the loader into the
# staging root $2, and appends "path-in-image<TAB>host-path<TAB>package<TAB>version" lines to
# the manifest $3 (package empty for the binary itself).
stage_binary() {
    local binary="$1" root="$2" manifest="$3" line lib pkg ver
    local libs=()
    install -D -m 0755 "$binary" "$root/usr/bin/$(basename "$binary")"
    printf '/usr/bin/%s\t%s\t\t\n' "$(basename "$binary")" "$binary" >>"$manifest"
    local out rc=0
    out="$(ldd "$binary" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ]; then
        # A statically linked binary needs nothing else.
        grep -q "not a dynamic executable\|statically linked" <<<"$out" && return 0
        die "ldd $binary failed: $out"
    fi
    while IFS= read -r line; do
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in
            *"not found"*) die "$binary links a library this machine lacks: $line" ;;
            *"=> /"*) lib="${line#*=> }" ;;
            *linux-vdso* | *linux-gate*) continue ;;
            /*) lib="$line" ;;
            *"statically linked"*) continue ;;
            *) die "cannot read this ldd line of $binary: $line" ;;
        esac
        lib="${lib%% (0x*}"
        libs+=("$lib")
    done <<<"$out"
    for lib in "${libs[@]}"; do
        [ -f "$lib" ] || die "ldd names $lib for $binary, but there is no such file"
        pkg="$(debian_owner "$lib")" || die "no Debian package owns $lib (dpkg -S): the SBOM could not name where it comes from"
        ver="$(dpkg-query -W -f='${Version}' "$pkg")"
        # The file itself, under the name the binary and the loader look it up by.
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
        printf '%s\t%s\t%s\t%s\n' "$lib" "$lib" "$pkg" "$ver" >>"$manifest"
        # The package's licence terms travel with its files.
        if [ -f "/usr/share/doc/$pkg/copyright" ] && [ ! -e "$root/usr/share/doc/$pkg/copyright" ]; then
            install -D -m 0644 "$(readlink -f "/usr/share/doc/$pkg/copyright")" "$root/usr/share/doc/$pkg/copyright"
            printf '%s\t%s\t%s\t%s\n' "/usr/share/doc/$pkg/copyright" "/usr/share/doc/$pkg/copyright" "$pkg" "$ver" >>"$manifest"
        fi
    done
}

# Writes the SPDX 2.3 JSON SBOM of one image to $1 from the staged root $2 and manifest $3.
write_sbom() {
    python3 - "$@" <<'EOF'
import hashlib, json, re, sys, urllib.parse
out, root, manifest, image, ref, version, revision, created, profile, license, source, arch, component, tree = sys.argv[1:15]

def spdx_id(kind, name):
    return f"SPDXRef-{kind}-" + re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-")

def checksums(path):
    data = open(path, "rb").read()
    return [{"algorithm": "SHA1", "checksumValue": hashlib.sha1(data).hexdigest()},
            {"algorithm": "SHA256", "checksumValue": hashlib.sha256(data).hexdigest()}]

distro = {}
for line in open("/etc/os-release"):
    k, _, v = line.strip().partition("=")
    distro[k] = v.strip('"')
distro_q = f"{distro.get('ID', 'debian')}-{distro.get('VERSION_ID', '')}".rstrip("-")

image_id = "SPDXRef-Image"
packages = [{
    "SPDXID": image_id,
    "name": image,
    "versionInfo": version,
    "primaryPackagePurpose": "CONTAINER",
    "supplier": "Organization: hapair",
    "downloadLocation": "NOASSERTION",
    "filesAnalyzed": False,
    "licenseConcluded": "NOASSERTION",
    "licenseDeclared": "NOASSERTION",
    "copyrightText": "NOASSERTION",
    "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                      "referenceLocator": f"pkg:oci/{image.rsplit('/', 1)[-1]}?repository_url={urllib.parse.quote(image, safe='/')}&tag={urllib.parse.quote(version)}&arch={arch}"}],
    "comment": f"{profile} build; {ref}",
}]
files, relationships = [], [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": image_id}]
deb_ids = {}
app_ids = []
for line in open(manifest):
    path, host, pkg, ver = line.rstrip("\n").split("\t")
    fid = spdx_id("File", path)
    entry = {"SPDXID": fid, "fileName": "." + path, "checksums": checksums(root + path),
             "licenseConcluded": "NOASSERTION", "copyrightText": "NOASSERTION"}
    if pkg:
        if pkg not in deb_ids:
            did = deb_ids[pkg] = spdx_id("Package-deb", pkg)
            packages.append({
                "SPDXID": did, "name": pkg, "versionInfo": ver,
                "primaryPackagePurpose": "LIBRARY",
                "supplier": "Organization: Debian",
                "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
                "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION",
                "copyrightText": "NOASSERTION",
                "comment": f"copied from this build machine's Debian package; its copyright file is /usr/share/doc/{pkg}/copyright",
                "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                  "referenceLocator": f"pkg:deb/debian/{pkg}@{urllib.parse.quote(ver, safe='')}?arch={arch}&distro={distro_q}"}],
            })
            relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": did})
        relationships.append({"spdxElementId": deb_ids[pkg], "relationshipType": "CONTAINS", "relatedSpdxElement": fid})
    elif path.startswith("/usr/bin/"):
        name = path.rsplit("/", 1)[-1]
        aid = spdx_id("Package", name)
        app_ids.append(aid)
        packages.append({
            "SPDXID": aid, "name": name, "versionInfo": version,
            "primaryPackagePurpose": "APPLICATION",
            "supplier": "Organization: hapair",
            "downloadLocation": f"git+{source}@{revision}" if revision != "unknown" else "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION", "licenseDeclared": license,
            "copyrightText": "NOASSERTION",
            "checksums": checksums(root + path),
            "comment": f"{profile} build of {source} at {revision} (working tree {tree})",
        })
        relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": aid})
        relationships.append({"spdxElementId": aid, "relationshipType": "CONTAINS", "relatedSpdxElement": fid})
    else:
        relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": fid})
    files.append(entry)
for aid in app_ids:
    for pkg, did in deb_ids.items():
        relationships.append({"spdxElementId": aid, "relationshipType": "DEPENDS_ON", "relatedSpdxElement": did})

digest = hashlib.sha256("".join(f["checksums"][1]["checksumValue"] for f in files).encode()).hexdigest()[:16]
doc = {
    "spdxVersion": "SPDX-2.3",
    "dataLicense": "CC0-1.0",
    "SPDXID": "SPDXRef-DOCUMENT",
    "name": f"{image}:{version}",
    "documentNamespace": f"{source}/sbom/{component}-{version}-{profile}-{digest}",
    "creationInfo": {"created": created, "creators": ["Tool: hapair-scripts-build-image.sh", "Organization: hapair"]},
    "documentDescribes": [image_id],
    "packages": packages,
    "files": files,
    "relationships": relationships,
}
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
EOF
}

sbom_path=/usr/share/doc/hapair/sbom.spdx.json
built=()
for component in "${images[@]}"; do
    name="hapair-$component"
    binary="$bin_dir/$name"
    [ -x "$binary" ] || die "no $name binary at $binary (build it first: cargo build --$profile --locked -p hapair-operator -p hapair-agent)"
    # The binary must be of this version: the tag says it.
    got="$("$binary" --version 2>&1)" || die "$binary --version failed: $got"
    [ "$got" = "$name $version" ] || die "$binary says '$got', not '$name $version': rebuild it from this checkout"
    read -r repository tag < <(chart_image "$component")
    [ -n "$repository" ] || die "no $component.image.repository in charts/hapair/values.yaml"
    tag="${tag:-$app_version}"
    ref="$repository:$tag"
    echo "==> $ref from $binary ($profile build)"

    root="$work/$component/rootfs"
    manifest="$work/$component/manifest.tsv"
    mkdir -p "$root/etc" "$root/tmp" "$root/usr/share/doc/hapair"
    : >"$manifest"
    chmod 1777 "$root/tmp"
    # Root for the agent (the chart runs it as UID 0 for its capabilities), hapair for the
    # default user; no shells, no home.
    printf 'root:x:0:0:root:/root:/sbin/nologin\nhapair:x:65532:65532:hapair:/nonexistent:/sbin/nologin\n' >"$root/etc/passwd"
    printf 'root:x:0:\nhapair:x:65532:\n' >"$root/etc/group"
    # Kubernetes mounts /etc/hosts and /etc/resolv.conf; look names up there in that order.
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
    chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
    for f in /etc/passwd /etc/group /etc/nsswitch.conf; do
        printf '%s\t\t\t\n' "$f" >>"$manifest"
    done
    stage_binary "$binary" "$root" "$manifest"

    sbom="$out_dir/$name-$tag.spdx.json"
    write_sbom "$sbom" "$root" "$manifest" "$repository" "$ref" "$version" "$revision" "$created" \
        "$profile" "$license" "$source_url" "$arch" "$name" "$tree_state"
    install -m 0644 "$sbom" "$root$sbom_path"

    case "$component" in
        operator)
            title="hapair-operator"
            description="hapair controller: the Kubernetes operator, or standalone on a directory of manifests"
            ports=(--port 8443/tcp --port 9090/tcp)
            # No command: without a subcommand the operator runs as the Kubernetes operator.
            cmd=()
            ;;
        agent)
            title="hapair-agent"
            description="hapair node agent (runs no shell, nbd-client, blkid or mount of its own: see docs/install.md)"
            ports=(--port 9464/tcp)
            cmd=(--cmd '["run","--config","/etc/hapair/agent.yaml"]')
            ;;
    esac
    [ "$profile" = release ] || description="$description; DEBUG BUILD, not for production"

    container="$("${buildah_cmd[@]}" from --quiet scratch)"
    "${buildah_cmd[@]}" copy --quiet "$container" "$root" / >/dev/null
    "${buildah_cmd[@]}" config \
        --created-by "scripts/build-image.sh ($profile build)" \
        --arch "$arch" --os linux \
        --user 65532:65532 \
        --workingdir / \
        --entrypoint "[\"/usr/bin/$name\"]" \
        ${cmd[@]+"${cmd[@]}"} \
        "${ports[@]}" \
        --label "org.opencontainers.image.title=$title" \
        --label "org.opencontainers.image.description=$description" \
        --label "org.opencontainers.image.version=$version" \
        --label "org.opencontainers.image.source=$source_url" \
        --label "org.opencontainers.image.url=$source_url" \
        --label "org.opencontainers.image.licenses=$license" \
        --label "org.opencontainers.image.revision=$revision" \
        --label "org.opencontainers.image.created=$created" \
        --label "org.opencontainers.image.vendor=hapair" \
        --label "dev.hapair.build.profile=$profile" \
        --label "dev.hapair.build.source-tree=$tree_state" \
        --label "dev.hapair.sbom=$sbom_path" \
        "$container"
    archive="$out_dir/$name-$tag.tar"
    rm -f "$archive"
    # --timestamp: the config's and every file's time is $created (reproducible with
    # SOURCE_DATE_EPOCH); layers gzip-compressed, as registries store them.
    "${buildah_cmd[@]}" commit --quiet --timestamp "$epoch" --disable-compression=false --identity-label=false \
        --format oci "$container" "oci-archive:$archive:$ref" >/dev/null
    "${buildah_cmd[@]}" rm "$container" >/dev/null
    container=""
    size="$(du -h "$archive" | cut -f1)"
    echo "    $archive ($size), SBOM $sbom"
    built+=("$component $name $tag $archive")
done

if [ -n "$push" ]; then
    push_flags=()
    read -ra push_flags <<<"${HAPAIR_PUSH_FLAGS:-}"
    for entry in "${built[@]}"; do
        read -r _ name tag archive <<<"$entry"
        dest="docker://$push/$name:$tag"
        echo "==> pushing $archive to $dest"
        skopeo copy --retry-times 2 ${push_flags[@]+"${push_flags[@]}"} "oci-archive:$archive" "$dest" ||
            die "pushing to $dest failed (logged in? skopeo login ${push%%/*})"
    done
fi
echo "==> images built: ${images[*]} ($profile, $version, revision $revision)"
