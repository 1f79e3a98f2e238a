// Command refestargz drives the reference eStargz implementation
// (github.com/containerd/stargz-snapshotter/estargz, as packaged by Debian)
// so that the Python tests can compare stargz_overlay against it.
//
//	refestargz build IN.tar OUT [--chunk-size N] [--prioritized a,b] [--level N] [--legacy]
//	refestargz ls BLOB
//	refestargz verify BLOB TOCDIGEST
//	refestargz open BLOB        (timing/memory probe for benchmarks)
//
// Every subcommand prints one JSON document on stdout; errors go to stderr
// with a non-zero exit code.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: refestargz build|ls|verify|open ..."))
	}
	var err error
	switch os.Args[1] {
	case "build":
		err = cmdBuild(os.Args[2:])
	case "ls":
		err = cmdLs(os.Args[2:])
	case "verify":
		err = cmdVerify(os.Args[2:])
	case "open":
		err = cmdOpen(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "refestargz:", err)
	os.Exit(1)
}

func printJSON(v interface{}) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	return enc.Encode(v)
}

// parseArgs separates positional arguments from flags so that flags may
// follow the positional arguments (Go's flag package stops at the first one).
func parseArgs(fs *flag.FlagSet, args []string, npos int) ([]string, error) {
	var pos, flags []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if strings.HasPrefix(a, "-") {
			flags = append(flags, a)
			name := strings.TrimLeft(a, "-")
			if !strings.Contains(name, "=") {
				if f := fs.Lookup(name); f != nil && !isBoolFlag(f) && i+1 < len(args) {
					i++
					flags = append(flags, args[i])
				}
			}
			continue
		}
		pos = append(pos, a)
	}
	if err := fs.Parse(flags); err != nil {
		return nil, err
	}
	if len(pos) != npos {
		return nil, fmt.Errorf("%s: want %d positional arguments, got %d", fs.Name(), npos, len(pos))
	}
	return pos, nil
}

func isBoolFlag(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// ---------------------------------------------------------------- build

type buildResult struct {
	TOCDigest        string   `json:"tocDigest"`
	DiffID           string   `json:"diffID"`
	UncompressedSize int64    `json:"uncompressedSize"`
	CompressedSize   int64    `json:"compressedSize"`
	Missed           []string `json:"missedPrioritized"`
	Seconds          float64  `json:"seconds"`
}

func cmdBuild(args []string) error {
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	chunkSize := fs.Int("chunk-size", 0, "chunk size (0 = library default, 4 MiB)")
	prioritized := fs.String("prioritized", "", "comma separated prioritized files")
	level := fs.Int("level", gzip.BestCompression, "gzip compression level")
	legacy := fs.Bool("legacy", false, "write legacy (google/crfs) stargz instead of eStargz")
	allowMissing := fs.Bool("allow-missing", false, "ignore prioritized files absent from the tar")
	pos, err := parseArgs(fs, args, 2)
	if err != nil {
		return err
	}
	in, err := os.Open(pos[0])
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(pos[1])
	if err != nil {
		return err
	}
	defer out.Close()
	start := time.Now()
	var res buildResult
	if *legacy {
		if *prioritized != "" {
			return errors.New("--prioritized is not supported with --legacy")
		}
		res.TOCDigest, err = buildLegacy(in, out, *chunkSize, *level)
	} else {
		res.TOCDigest, res.Missed, err = buildEStargz(in, out, *chunkSize, *level, *prioritized, *allowMissing)
	}
	if err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return err
	}
	res.Seconds = time.Since(start).Seconds()
	// diffID and uncompressed size of the whole decompressed stream
	// (including the TOC entry and tar EOF), as the converters annotate it.
	if _, err := out.Seek(0, io.SeekStart); err != nil {
		return err
	}
	st, err := out.Stat()
	if err != nil {
		return err
	}
	res.CompressedSize = st.Size()
	zr, err := gzip.NewReader(out)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(h, zr)
	if err != nil {
		return err
	}
	res.UncompressedSize = n
	res.DiffID = "sha256:" + hex.EncodeToString(h.Sum(nil))
	if res.Missed == nil {
		res.Missed = []string{}
	}
	return printJSON(res)
}

func buildEStargz(in *os.File, out io.Writer, chunkSize, level int, prioritized string, allowMissing bool) (string, []string, error) {
	st, err := in.Stat()
	if err != nil {
		return "", nil, err
	}
	opts := []estargz.Option{estargz.WithCompressionLevel(level)}
	if chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(chunkSize))
	}
	var missed []string
	if prioritized != "" {
		opts = append(opts, estargz.WithPrioritizedFiles(strings.Split(prioritized, ",")))
		if allowMissing {
			opts = append(opts, estargz.WithAllowPrioritizeNotFound(&missed))
		}
	}
	blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
	if err != nil {
		return "", nil, err
	}
	defer blob.Close()
	if _, err := io.Copy(out, blob); err != nil {
		return "", nil, err
	}
	return blob.TOCDigest().String(), missed, nil
}

// legacyCompressor makes estargz.Writer produce a google/crfs style legacy
// stargz blob: the TOC member carries the "stargz.toc" gzip Extra, the JSON
// has no chunkDigest but a NumLink key in every entry, and the footer is the
// 47-byte legacy one. The 0.12 library reads this format but cannot write it.
type legacyCompressor struct{ level int }

func (c *legacyCompressor) Writer(w io.Writer) (io.WriteCloser, error) {
	return gzip.NewWriterLevel(w, c.level)
}

type legacyEntry struct {
	Name        string            `json:"name"`
	Type        string            `json:"type"`
	Size        int64             `json:"size,omitempty"`
	ModTime3339 string            `json:"modtime,omitempty"`
	LinkName    string            `json:"linkName,omitempty"`
	Mode        int64             `json:"mode,omitempty"`
	UID         int               `json:"uid,omitempty"`
	GID         int               `json:"gid,omitempty"`
	Uname       string            `json:"userName,omitempty"`
	Gname       string            `json:"groupName,omitempty"`
	Offset      int64             `json:"offset,omitempty"`
	DevMajor    int               `json:"devMajor,omitempty"`
	DevMinor    int               `json:"devMinor,omitempty"`
	NumLink     int               // crfs had no JSON tag here: always written
	Xattrs      map[string][]byte `json:"xattrs,omitempty"`
	Digest      string            `json:"digest,omitempty"`
	ChunkOffset int64             `json:"chunkOffset,omitempty"`
	ChunkSize   int64             `json:"chunkSize,omitempty"`
}

func (c *legacyCompressor) WriteTOCAndFooter(w io.Writer, off int64, toc *estargz.JTOC, diffHash hash.Hash) (digest.Digest, error) {
	var ltoc struct {
		Version int            `json:"version"`
		Entries []*legacyEntry `json:"entries"`
	}
	ltoc.Version = toc.Version
	for _, e := range toc.Entries {
		ltoc.Entries = append(ltoc.Entries, &legacyEntry{
			Name: e.Name, Type: e.Type, Size: e.Size, ModTime3339: e.ModTime3339,
			LinkName: e.LinkName, Mode: e.Mode, UID: e.UID, GID: e.GID,
			Uname: e.Uname, Gname: e.Gname, Offset: e.Offset,
			DevMajor: e.DevMajor, DevMinor: e.DevMinor, Xattrs: e.Xattrs,
			Digest: e.Digest, ChunkOffset: e.ChunkOffset, ChunkSize: e.ChunkSize,
		})
	}
	tocJSON, err := json.MarshalIndent(ltoc, "", "\t")
	if err != nil {
		return "", err
	}
	gz, err := gzip.NewWriterLevel(w, c.level)
	if err != nil {
		return "", err
	}
	gz.Header.Extra = []byte("stargz.toc")
	gw := io.Writer(gz)
	if diffHash != nil {
		gw = io.MultiWriter(gz, diffHash)
	}
	tw := tar.NewWriter(gw)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: estargz.TOCTarName, Size: int64(len(tocJSON))}); err != nil {
		return "", err
	}
	if _, err := tw.Write(tocJSON); err != nil {
		return "", err
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	if err := gz.Close(); err != nil {
		return "", err
	}
	if _, err := w.Write(legacyFooter(off)); err != nil {
		return "", err
	}
	return digest.FromBytes(tocJSON), nil
}

func legacyFooter(tocOff int64) []byte {
	var buf bytes.Buffer
	gz, _ := gzip.NewWriterLevel(&buf, gzip.NoCompression)
	gz.Header.Extra = []byte(fmt.Sprintf("%016xSTARGZ", tocOff))
	gz.Close()
	if buf.Len() != 47 {
		panic(fmt.Sprintf("legacy footer is %d bytes", buf.Len()))
	}
	return buf.Bytes()
}

func buildLegacy(in io.Reader, out io.Writer, chunkSize, level int) (string, error) {
	w := estargz.NewWriterWithCompressor(out, &legacyCompressor{level})
	w.ChunkSize = chunkSize
	if err := w.AppendTar(in); err != nil {
		return "", err
	}
	d, err := w.Close()
	return d.String(), err
}

// ---------------------------------------------------------------- ls

type chunkInfo struct {
	Offset      int64  `json:"offset"`
	ChunkOffset int64  `json:"chunkOffset"`
	ChunkSize   int64  `json:"chunkSize"`
	ChunkDigest string `json:"chunkDigest"`
}

type lsEntry struct {
	Path      string            `json:"path"` // path in the tree (hardlinks: the link's own path)
	Name      string            `json:"name"` // name of the TOC entry (hardlinks: the target's)
	Type      string            `json:"type"`
	Mode      int64             `json:"mode"`
	UID       int               `json:"uid"`
	GID       int               `json:"gid"`
	UserName  string            `json:"userName"`
	GroupName string            `json:"groupName"`
	Size      int64             `json:"size"`
	ModTime   int64             `json:"modtime"` // Unix seconds; 0 when absent
	LinkName  string            `json:"linkName"`
	DevMajor  int               `json:"devMajor"`
	DevMinor  int               `json:"devMinor"`
	Xattrs    map[string][]byte `json:"xattrs"` // base64 in JSON
	Digest    string            `json:"digest"`
	NumLink   int               `json:"NumLink"`
	Content   string            `json:"contentSha256,omitempty"` // "sha256:..." of OpenFile bytes
	Chunks    []chunkInfo       `json:"chunks,omitempty"`
}

type lsResult struct {
	TOCDigest string     `json:"tocDigest"`
	Entries   []*lsEntry `json:"entries"`
}

func openBlob(p string) (*os.File, *estargz.Reader, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, r, nil
}

// walk visits every path of the tree in sorted order, root first.
func walk(r *estargz.Reader, fn func(p string, e *estargz.TOCEntry) error) error {
	root, ok := r.Lookup("")
	if !ok {
		return errors.New("blob has no root directory")
	}
	var rec func(p string, e *estargz.TOCEntry) error
	rec = func(p string, e *estargz.TOCEntry) error {
		if err := fn(p, e); err != nil {
			return err
		}
		if e.Type != "dir" {
			return nil
		}
		var names []string
		kids := map[string]*estargz.TOCEntry{}
		e.ForeachChild(func(base string, c *estargz.TOCEntry) bool {
			names = append(names, base)
			kids[base] = c
			return true
		})
		sort.Strings(names)
		for _, n := range names {
			if err := rec(path.Join(p, n), kids[n]); err != nil {
				return err
			}
		}
		return nil
	}
	return rec("", root)
}

// chunksOf lists the (filled-in) chunk entries of a regular file. It looks
// the chunks up by the entry's own name: ChunkEntryForOffset given a
// hardlink's path only finds the first chunk (0.12 keys chunks by name).
func chunksOf(r *estargz.Reader, p string, e *estargz.TOCEntry) ([]*estargz.TOCEntry, error) {
	var out []*estargz.TOCEntry
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(e.Name, off)
		if !ok {
			return nil, fmt.Errorf("%s: no chunk for offset %d", p, off)
		}
		if ce.ChunkOffset != off || ce.ChunkSize <= 0 {
			return nil, fmt.Errorf("%s: bad chunk at offset %d (chunkOffset %d, chunkSize %d)", p, off, ce.ChunkOffset, ce.ChunkSize)
		}
		out = append(out, ce)
		off += ce.ChunkSize
	}
	return out, nil
}

// readChunk returns the bytes of one chunk, read through OpenFile with one
// ReadAt per chunk (the library re-decompresses from the chunk start on every ReadAt).
func readChunk(sr *io.SectionReader, ce *estargz.TOCEntry) ([]byte, error) {
	buf := make([]byte, ce.ChunkSize)
	n, err := sr.ReadAt(buf, ce.ChunkOffset)
	if n == len(buf) {
		return buf, nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return nil, err
}

func cmdLs(args []string) error {
	fs := flag.NewFlagSet("ls", flag.ContinueOnError)
	pos, err := parseArgs(fs, args, 1)
	if err != nil {
		return err
	}
	f, r, err := openBlob(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	res := lsResult{TOCDigest: r.TOCDigest().String()}
	err = walk(r, func(p string, e *estargz.TOCEntry) error {
		le := &lsEntry{
			Path: p, Name: e.Name, Type: e.Type, Mode: e.Mode, UID: e.UID, GID: e.GID,
			UserName: e.Uname, GroupName: e.Gname, Size: e.Size, LinkName: e.LinkName,
			DevMajor: e.DevMajor, DevMinor: e.DevMinor, Xattrs: e.Xattrs, Digest: e.Digest,
			NumLink: e.NumLink,
		}
		if !e.ModTime().IsZero() {
			le.ModTime = e.ModTime().Unix()
		}
		if le.Xattrs == nil {
			le.Xattrs = map[string][]byte{}
		}
		if e.Type == "reg" {
			sr, err := r.OpenFile(p)
			if err != nil {
				return fmt.Errorf("%s: %v", p, err)
			}
			chunks, err := chunksOf(r, p, e)
			if err != nil {
				return err
			}
			h := sha256.New()
			for _, ce := range chunks {
				b, err := readChunk(sr, ce)
				if err != nil {
					return fmt.Errorf("%s: read chunk at %d: %v", p, ce.ChunkOffset, err)
				}
				h.Write(b)
				le.Chunks = append(le.Chunks, chunkInfo{ce.Offset, ce.ChunkOffset, ce.ChunkSize, ce.ChunkDigest})
			}
			le.Content = "sha256:" + hex.EncodeToString(h.Sum(nil))
		}
		res.Entries = append(res.Entries, le)
		return nil
	})
	if err != nil {
		return err
	}
	return printJSON(res)
}

// ---------------------------------------------------------------- verify

func cmdVerify(args []string) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	pos, err := parseArgs(fs, args, 2)
	if err != nil {
		return err
	}
	f, r, err := openBlob(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	want, err := digest.Parse(pos[1])
	if err != nil {
		return err
	}
	v, err := r.VerifyTOC(want)
	if err != nil {
		return err
	}
	seen := map[*estargz.TOCEntry]bool{}
	var files, chunks int
	var bytesOK int64
	err = walk(r, func(p string, e *estargz.TOCEntry) error {
		if e.Type != "reg" || e.Size == 0 || seen[e] {
			return nil
		}
		seen[e] = true
		files++
		sr, err := r.OpenFile(p)
		if err != nil {
			return fmt.Errorf("%s: %v", p, err)
		}
		cs, err := chunksOf(r, p, e)
		if err != nil {
			return err
		}
		for _, ce := range cs {
			b, err := readChunk(sr, ce)
			if err != nil {
				return fmt.Errorf("%s: read chunk at %d: %v", p, ce.ChunkOffset, err)
			}
			dv, err := v.Verifier(ce)
			if err != nil {
				return fmt.Errorf("%s: %v", p, err)
			}
			dv.Write(b)
			if !dv.Verified() {
				return fmt.Errorf("%s: chunk at %d (blob offset %d) does not match its digest", p, ce.ChunkOffset, ce.Offset)
			}
			chunks++
			bytesOK += int64(len(b))
		}
		return nil
	})
	if err != nil {
		return err
	}
	return printJSON(map[string]interface{}{
		"tocDigest": r.TOCDigest().String(), "files": files, "chunks": chunks, "bytes": bytesOK,
	})
}

// ---------------------------------------------------------------- open

// cmdOpen times estargz.Open (footer + TOC parse + tree) and reports the peak RSS.
func cmdOpen(args []string) error {
	fs := flag.NewFlagSet("open", flag.ContinueOnError)
	pos, err := parseArgs(fs, args, 1)
	if err != nil {
		return err
	}
	start := time.Now()
	f, r, err := openBlob(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	secs := time.Since(start).Seconds()
	n := 0
	if err := walk(r, func(string, *estargz.TOCEntry) error { n++; return nil }); err != nil {
		return err
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return err
	}
	return printJSON(map[string]interface{}{
		"seconds": secs, "paths": n, "maxRssKiB": ru.Maxrss, "vmHWMKiB": vmHWM(),
	})
}

// vmHWM is this process's peak RSS from /proc/self/status (KiB), or -1.
// Unlike ru_maxrss it does not inherit the parent's peak across fork+exec.
func vmHWM() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			var kib int64
			if _, err := fmt.Sscanf(strings.TrimSpace(line[len("VmHWM:"):]), "%d", &kib); err == nil {
				return kib
			}
		}
	}
	return -1
}
