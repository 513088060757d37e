// Records one real FileSync.DiffCopy exchange between fsutil's own Go sender and Go
// receiver (the code buildctl and BuildKit run), packet by packet, as the bytes each side
// puts on the wire. The Rust tests in worker/src/session/filesync/recorded.rs replay them.
//
// Build and run with record.sh (Debian's golang-1.19-go and
// golang-github-tonistiigi-fsutil-dev; GOPATH mode).
package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/tonistiigi/fsutil"
	"github.com/tonistiigi/fsutil/types"
)

type rec struct {
	mu    sync.Mutex
	lines []string
}

func (r *rec) add(dir string, b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, dir+" "+hex.EncodeToString(b))
}

// pipe is one direction-aware end of an in-memory packet stream.
type pipe struct {
	ctx context.Context
	out chan []byte
	in  chan []byte
	dir string
	log *rec
}

func (p *pipe) Context() context.Context { return p.ctx }

func (p *pipe) SendMsg(m interface{}) error {
	b, err := m.(*types.Packet).Marshal()
	if err != nil {
		return err
	}
	p.log.add(p.dir, b)
	p.out <- b
	return nil
}

func (p *pipe) RecvMsg(m interface{}) error {
	b, ok := <-p.in
	if !ok {
		// The other side returned: as a finished gRPC stream, EOF.
		return io.EOF
	}
	return m.(*types.Packet).Unmarshal(b)
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func main() {
	src := os.Args[1]
	dest := os.Args[2]
	ctx := context.Background()
	log := &rec{}
	a := make(chan []byte, 1024)
	b := make(chan []byte, 1024)
	sender := &pipe{ctx: ctx, out: a, in: b, dir: "S", log: log}
	receiver := &pipe{ctx: ctx, out: b, in: a, dir: "R", log: log}
	// Each side's return ends its stream, as with gRPC: the other sees EOF.
	var wg sync.WaitGroup
	wg.Add(2)
	var sendErr, recvErr error
	go func() {
		defer wg.Done()
		sendErr = fsutil.Send(ctx, sender, fsutil.NewFS(src, &fsutil.WalkOpt{}), nil)
		close(a)
	}()
	go func() {
		defer wg.Done()
		recvErr = fsutil.Receive(ctx, receiver, dest, fsutil.ReceiveOpt{})
		close(b)
	}()
	wg.Wait()
	must(sendErr)
	must(recvErr)
	for _, l := range log.lines {
		fmt.Println(l)
	}
}
